"""The input pipeline: a prepared dataset through TFDS `as_data_source` and
Grain, with no TensorFlow.

* A split is a list of image names, mapped to record indices of the one
  prepared dataset (`PreparedDataset.indices`).
* Training order: epoch e is a permutation of the split drawn from
  (`seed`, e), so the same seed gives the same batches on any machine and
  every epoch is reshuffled.
* Per-process share: process p of P takes elements p, p+P, p+2P, ... of the
  global order and batches them by global_batch / P. Its local batch b is then
  exactly its share of global batch b, so each process decodes only its own
  images and the P local batches together are the global batch.
* Grain's elements are whole batches: batch b's indices come from the
  order, and one call reads, decodes and stacks them (`_LoadBatch`). Grain
  runs those calls in threads or worker processes, in order.
* Pixels leave the host as uint8 with one channel (4x less to transfer than
  float32, 12x less than 3-channel float32); `to_model_input` scales them to
  [-1, 1] and makes 3 channels on the device, inside the jitted step
  (benchmarks/data.py measures both placements).
* Optional augmentation (off by default, as in the paper): horizontal flip and
  a small random crop/rescale, seeded per element by its position.
* The iterator's state (`get_state`/`set_state`) is a small dict saved with
  each checkpoint, so a resumed run sees exactly the batches it would have.
* Training and evaluation read two fields of each serialized record, the
  PNG (decoded by libpng) and the labels, not TFDS's decoding of all of
  them; `PreparedDataset.image_and_labels` says why and how it is checked.
* Optional worker processes (`loader_workers`) decode training batches
  beside the threads and yield the same batches (`TrainBatches`).
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import os
import sys
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from cxr_jax import labels as L
from cxr_jax.data import metadata as M
from cxr_jax.data.tfds_builder import gray8_pixels

Batch = dict[str, np.ndarray]


def find_prepared(data_dir: str, image_size: int | None = None) -> str:
  """The versioned TFDS folder of a prepared dataset under `data_dir`."""
  if os.path.exists(os.path.join(data_dir, "dataset_info.json")):
    return data_dir
  pattern = os.path.join(data_dir, "chestxray14",
                         f"{image_size}px" if image_size else "*px", "*")
  found = sorted(p for p in glob.glob(pattern)
                 if os.path.exists(os.path.join(p, "dataset_info.json")))
  if not found:
    raise FileNotFoundError(
        f"no prepared ChestX-ray14 dataset"
        f"{f' at {image_size}px' if image_size else ''} under {data_dir}; "
        f"run `cxr-jax prepare --data_dir NIH_DIR --out {data_dir}`")
  if len(found) > 1 and image_size is None:
    raise ValueError(f"{data_dir} holds several prepared sizes "
                     f"({', '.join(found)}); set image_size")
  return found[-1]


class PreparedDataset:
  """Random access to the records of a prepared dataset."""

  def __init__(self, data_dir: str, image_size: int | None = None):
    import tensorflow_datasets as tfds
    from tensorflow_datasets.proto import tf_example_pb2
    self._opened_as = {"data_dir": data_dir, "image_size": image_size}
    self._example = tf_example_pb2.Example
    self.path = find_prepared(data_dir, image_size)
    self.builder = tfds.builder_from_directory(self.path)
    self.source = self.builder.as_data_source("images")
    # The same records as serialized bytes, for `image_and_labels`.
    self._raw = self.builder.as_data_source(
        "images", deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
    md = self.builder.info.metadata or {}
    self.names: list[str] = list(md.get("names", []))
    if len(self.names) != len(self.source):
      raise ValueError(f"{self.path}: metadata lists {len(self.names)} names "
                       f"for {len(self.source)} records")
    self.image_size = int(md.get("image_size",
                                 self.builder.info.features["image"].shape[0]))
    self.metadata = dict(md)
    self._index = {n: i for i, n in enumerate(self.names)}
    self._check_metadata_copies(data_dir)
    if len(self):
      self._check_fast_reader(0)

  def _check_metadata_copies(self, data_dir: str) -> None:
    """Splits and evaluation read the metadata copies beside the dataset:
    they must be the files its records were built from."""
    recorded = (self.metadata.get("source") or {}).get("files")
    copies = os.path.join(data_dir, M.METADATA_DIR)
    if not recorded or not os.path.isdir(copies):
      return
    now = M.digests(copies)
    differ = sorted(n for n in set(recorded) | set(now)
                    if recorded.get(n) != now.get(n))
    if differ:
      raise ValueError(
          f"{self.path} was prepared from other metadata files than the "
          f"copies in {copies} ({', '.join(differ)} differ): run `cxr-jax "
          f"prepare --out {data_dir} --image_size {self.image_size}` again")

  def __len__(self) -> int:
    return len(self.names)

  # Loader worker processes receive the dataset pickled: they open the same
  # folder again rather than copy TFDS's readers.
  def __getstate__(self) -> dict:
    return dict(self._opened_as)

  def __setstate__(self, opened_as: dict) -> None:
    self.__init__(**opened_as)

  def indices(self, names: Sequence[str], what: str = "split") -> np.ndarray:
    """Record indices of `names`; names absent from the dataset are an error
    that counts them (a split over images that were never prepared)."""
    missing = [n for n in names if n not in self._index]
    if missing:
      raise KeyError(f"{len(missing)} of {len(names)} images of the {what} are "
                     f"not in the prepared dataset {self.path} (first: "
                     f"{', '.join(missing[:5])})")
    return np.array([self._index[n] for n in names], np.int64)

  def record(self, index: int) -> dict[str, Any]:
    """Every field of record `index`, decoded by TFDS."""
    return self.source[int(index)]

  def image_and_labels(self, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Record `index`'s image (uint8 [S, S, 1]) and its 15 training targets,
    which is all that training and evaluation read.

    TFDS's decoding of a whole record turns every field into numpy, the
    boxes and names included, and decodes the PNG with PIL: three to four
    times the cost of reading the two fields from the serialized Example and
    decoding the PNG with libpng (benchmarks/RESULTS.md, data.py). The
    result is equal to `record`'s (checked on a record when the dataset
    opens, and on every record in tests/test_data.py).
    """
    images, targets = self.images_and_labels(np.array([index]))
    return images[0], targets[0]

  def images_and_labels(self, indices: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [n, S, S, 1] and float32 [n, 15] of records `indices`, as
    `image_and_labels` reads each; index -1 is padding, zeros."""
    size = self.image_size
    images = np.zeros((len(indices), size, size, 1), np.uint8)
    targets = np.zeros((len(indices), L.NUM_OUTPUTS), np.float32)
    for k, index in enumerate(indices):
      if index < 0:
        continue
      index = int(index)
      example = self._example.FromString(self._raw[index])
      feature = example.features.feature
      try:
        pixels = _decode_png(feature["image"].bytes_list.value[0])
        labels = feature["labels"].int64_list.value
        normal = feature["normal"].int64_list.value
      except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"{self.path}: record {index} "
                         f"({self.names[index]}) cannot be read: "
                         f"{type(e).__name__}: {e}") from None
      if (pixels.shape != (size, size) or len(labels) != L.NUM_DISEASES
          or len(normal) != 1):
        raise ValueError(f"{self.path}: record {index} "
                         f"({self.names[index]}) holds a "
                         f"{'x'.join(map(str, pixels.shape))} image, "
                         f"{len(labels)} labels and {len(normal)} normal "
                         f"flags; the dataset is {size}px with "
                         f"{L.NUM_DISEASES} labels")
      images[k, :, :, 0] = pixels
      targets[k, :L.NUM_DISEASES] = labels
      targets[k, L.NUM_DISEASES] = normal[0]
    return images, targets

  def _check_fast_reader(self, index: int) -> None:
    """`image_and_labels` must equal TFDS's decoding: a TFDS that
    serialized records differently fails here, not in training."""
    image, targets = self.image_and_labels(index)
    r = self.record(index)
    if not (np.array_equal(image, r["image"]) and
            np.array_equal(targets, labels_with_normal(r))):
      raise ValueError(f"{self.path}: record {index} reads differently "
                       f"from its serialized fields than through TFDS; "
                       f"this TFDS version is not supported by the fast "
                       f"reader")


def _decode_png(data: bytes) -> np.ndarray:
  """uint8 [H, W] of a gray 8-bit PNG (as `prepare` writes them): libpng
  through imagecodecs, else PIL."""
  pixels = gray8_pixels(data)
  if pixels is None:
    import io
    from PIL import Image
    with Image.open(io.BytesIO(data)) as im:
      pixels = np.asarray(im)
  if pixels.dtype != np.uint8 or pixels.ndim != 2:
    raise ValueError(f"a {pixels.dtype} PNG of shape {pixels.shape}, not "
                     f"8-bit gray")
  return pixels


def labels_with_normal(record) -> np.ndarray:
  """The 15 training targets: 14 diseases, then the "normal" flag."""
  return np.concatenate([record["labels"].astype(np.float32),
                         np.array([float(record["normal"])], np.float32)])


@dataclasses.dataclass(frozen=True)
class Augment:
  """Random horizontal flip and crop/rescale (both off by default)."""

  flip: bool = False
  min_crop: float = 1.0  # side of the random crop, fraction of the image

  @property
  def active(self) -> bool:
    return self.flip or self.min_crop < 1.0

  def __call__(self, image: np.ndarray, rng: np.random.Generator
               ) -> np.ndarray:
    """uint8 [S, S, 1] -> the same shape, cropped, rescaled and flipped."""
    if self.min_crop < 1.0:
      from PIL import Image
      size = image.shape[0]
      side = int(round(size * rng.uniform(self.min_crop, 1.0)))
      y, x = rng.integers(0, size - side + 1, 2)
      crop = Image.fromarray(image[y:y + side, x:x + side, 0])
      image = np.asarray(crop.resize((size, size),
                                     Image.Resampling.BILINEAR))[..., None]
    if self.flip and rng.random() < 0.5:
      image = image[:, ::-1]
    return image


class _TrainOrder:
  """Batch b -> the record indices of this process's local batch b.

  Epoch e of the global order is a permutation of the split drawn from
  (seed, e), so the same seed gives the same order on any machine and every
  epoch is reshuffled. Position q of the global order is this process's
  when q % P == p: its local batch b is exactly its share of global batch b.
  Computing a batch's indices from a cached permutation costs next to
  nothing per element, where Grain's index shuffle and per-element datasets
  cost more than reading the record (benchmarks/RESULTS.md).
  """

  def __init__(self, indices: np.ndarray, seed: int, local: int, p: int,
               count: int):
    self.indices, self.seed = np.asarray(indices, np.int64), seed
    self.local, self.p, self.count = local, p, count
    self._epochs: dict[int, np.ndarray] = {}

  def __getstate__(self) -> dict:
    return {**self.__dict__, "_epochs": {}}

  def _epoch(self, e: int) -> np.ndarray:
    order = self._epochs.get(e)
    if order is None:
      order = self.indices[np.random.default_rng(
          [self.seed, e]).permutation(len(self.indices))]
      # Loader threads share this cache: a dict is never changed once
      # published, only replaced, and threads racing here compute the same
      # permutation.
      epochs = {k: v for k, v in self._epochs.items() if k >= e - 1}
      epochs[e] = order
      self._epochs = epochs
    return order

  def __call__(self, b: int) -> np.ndarray:
    n = len(self.indices)
    positions = (b * self.local + np.arange(self.local)) * self.count + self.p
    epochs = positions // n
    out = np.empty(self.local, np.int64)
    for e in np.unique(epochs):
      at = epochs == e
      out[at] = self._epoch(int(e))[positions[at] % n]
    return out


class _EvalOrder:
  """Batch b -> this process's share of global batch b of `indices` in
  order, padded with -1."""

  def __init__(self, indices: np.ndarray, local: int, p: int, count: int):
    self.share = np.asarray(indices, np.int64)[p::count]
    self.local = local

  def __len__(self) -> int:
    return len(self.share) // self.local

  def __call__(self, b: int) -> np.ndarray:
    return self.share[b * self.local:(b + 1) * self.local]


class _LoadBatch:
  """Batch number -> {'image' uint8 [B,S,S,1], 'labels' [B,15], 'mask' [B],
  'index' [B]}: one call per batch, which Grain's threads and workers run.

  Index -1 is padding (evaluation's last batch): zeros with mask 0. With
  augmentation, element k of batch b draws from the Philox stream
  (seed, b * B + k), so the same batch is augmented the same way in any
  thread or worker and after a resume.
  """

  def __init__(self, dataset: PreparedDataset, order, augment: Augment =
               Augment(), seed: int = 0):
    self.dataset, self.order = dataset, order
    self.augment, self.seed = augment, seed

  def __call__(self, b: int) -> Batch:
    index = self.order(b)
    images, labels = self.dataset.images_and_labels(index)
    if self.augment.active:
      for k in range(len(index)):
        rng = np.random.Generator(np.random.Philox(
            key=self.seed, counter=b * len(index) + k))
        images[k] = self.augment(images[k], rng)
    return {"image": images, "labels": labels,
            "mask": (index >= 0).astype(np.float32), "index": index}


def _process_share(global_batch: int, process_index: int | None,
                   process_count: int | None) -> tuple[int, int, int]:
  if process_index is None or process_count is None:
    import jax
    process_index, process_count = jax.process_index(), jax.process_count()
  if global_batch % process_count:
    raise ValueError(f"global batch {global_batch} is not divisible by "
                     f"{process_count} processes")
  return process_index, process_count, global_batch // process_count


def _read_options(threads: int):
  import grain
  # Elements are whole batches: two per thread keep every thread busy, and
  # bound what waits in memory (a local batch of 512 films at 299 px is
  # 46 MB).
  return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=
                           max(2 * threads, 2))


def train_dataset(dataset: PreparedDataset, names: Sequence[str],
                  global_batch: int, seed: int, augment: Augment = Augment(),
                  process_index: int | None = None,
                  process_count: int | None = None, threads: int = 4,
                  workers: int = 0) -> "TrainBatches":
  """Endless, seeded batches of this process's share; `workers` > 0 decodes
  in that many worker processes (the same batches)."""
  import grain
  p, count, local = _process_share(global_batch, process_index, process_count)
  indices = dataset.indices(names, "training split")
  if not len(indices):
    raise ValueError(f"the training split has no images of {dataset.path}")
  order = _TrainOrder(indices, seed, local, p, count)
  batches = grain.MapDataset.range(sys.maxsize).map(
      _LoadBatch(dataset, order, augment, seed + 1))
  return TrainBatches(batches, threads, workers)


class TrainBatches:
  """The training batches, as an iterable whose iterators save and restore
  their position.

  Batch n is element n of one seeded MapDataset, so a position is the number
  of batches drawn ({'next_index': n}, what Grain's own iterator saves) and
  resuming reads from batch n on. The position means the same with or
  without worker processes, whatever their number: a resumed run may change
  `loader_workers`. Grain's workers each take every k-th batch and their
  outputs are interleaved in order, so they yield the same batches as one
  process.
  """

  def __init__(self, batches, threads: int, workers: int):
    self._batches, self._threads, self._workers = batches, threads, workers

  def __iter__(self) -> "TrainBatches._Iterator":
    return TrainBatches._Iterator(self)

  def _open(self, start: int):
    import grain
    ds = self._batches[start:].to_iter_dataset(_read_options(self._threads))
    if self._workers:
      from absl import flags
      if not flags.FLAGS.is_parsed():
        # Grain up to 0.2.18 reads an absl flag when starting workers under
        # JAX, which raises in a program that never parsed absl flags
        # (google/grain#1355, fixed upstream by defaulting the flag).
        flags.FLAGS.mark_as_parsed()
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=self._workers))
    return iter(ds)

  class _Iterator:

    def __init__(self, source: "TrainBatches"):
      # Opened at the first batch, so that a resume (set_state first) starts
      # the threads and workers once.
      self._source, self._drawn, self._it = source, 0, None

    def __iter__(self):
      return self

    def __next__(self) -> Batch:
      if self._it is None:
        self._it = self._source._open(self._drawn)
      batch = next(self._it)
      self._drawn += 1
      return batch

    def get_state(self) -> dict:
      return {"next_index": self._drawn}

    def set_state(self, state: dict) -> None:
      self.close()
      self._drawn = int(state["next_index"])

    def close(self) -> None:
      """Stops worker processes now rather than at garbage collection."""
      it, self._it = self._it, None
      close = getattr(it, "close", None)
      if close is not None:
        close()


def eval_batches(dataset: PreparedDataset, names: Sequence[str],
                 global_batch: int, process_index: int | None = None,
                 process_count: int | None = None, threads: int = 4
                 ) -> Iterator[Batch]:
  """One ordered pass; the last global batch is padded (mask 0). Every process
  yields the same number of local batches."""
  import grain
  p, count, local = _process_share(global_batch, process_index, process_count)
  idx = dataset.indices(names, "evaluation split")
  pad = (-len(idx)) % global_batch
  order = _EvalOrder(np.concatenate([idx, -np.ones(pad, np.int64)]), local,
                     p, count)
  ds = grain.MapDataset.range(len(order)).map(_LoadBatch(dataset, order))
  return iter(ds.to_iter_dataset(_read_options(threads)))


class DeviceFeed:
  """Batches placed on the devices ahead of the step that trains on them.

  `put` (a back-end's `put_batch`) starts an asynchronous transfer, so after
  `fill()` the next `depth` batches travel while the current step runs
  (flax's `prefetch_to_device`). Each batch keeps the loader's state from
  before it was drawn: `get_state()` is the state before the first batch not
  yet trained on, so a checkpoint resumes exactly where training stopped,
  not after the batches waiting here.
  """

  def __init__(self, batches, put: Callable[[Batch], Any], depth: int = 2):
    self._batches, self._put, self._depth = batches, put, depth
    self._queue: collections.deque = collections.deque()

  def fill(self) -> None:
    while len(self._queue) < self._depth:
      state = self._batches.get_state()
      self._queue.append((state, self._put(next(self._batches))))

  def pop(self) -> Any:
    """The next placed batch (drawn now if none is waiting)."""
    if not self._queue:
      self.fill()
    return self._queue.popleft()[1]

  def peek(self) -> Any:
    """The next placed batch, left in place (to compile the step for it)."""
    self.fill()
    return self._queue[0][1]

  def get_state(self) -> dict:
    return self._queue[0][0] if self._queue else self._batches.get_state()


def to_model_input(images):
  """uint8 [B, H, W, 1] -> float32 [B, H, W, 3] in [-1, 1] (jit-friendly).

  Runs on the device inside the jitted step: the paper scales pixels to
  [-1, 1] and repeats the gray channel for the ImageNet-shaped first conv.
  """
  import jax.numpy as jnp
  x = images.astype(jnp.float32) * (2.0 / 255.0) - 1.0
  return jnp.broadcast_to(x, x.shape[:-1] + (3,))

