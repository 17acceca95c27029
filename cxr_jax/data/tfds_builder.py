"""`cxr-jax prepare`: the NIH layout into a TFDS dataset of ArrayRecord files.

The builder reads the official layout from a manual directory (`images/` or
`images_0NN/images/` subfolders beside the CSVs), decodes each PNG to 8-bit
gray, resizes it with antialiasing to `image_size` and stores PNG bytes, so
TFDS needs no TensorFlow to write it (it never sees a numpy image). Decoding
runs in a process pool on all cores; records are written in image-name order
(DatasetInfo's `disable_shuffling`), so record i is `metadata['names'][i]`,
and stored uncompressed (`store_records_uncompressed`).

Gray conversion: L as is; RGB/RGBA/LA (R=G=B in NIH's RGBA files), palette
and 1-bit through PIL's luminance; 16-bit and float images are stretched from
their own min..max to 0..255 (their bit depth is not recorded in the file).

Nothing is dropped silently: images listed in the CSV but absent stop the
build (naming the count and the first names) unless `allow_missing`, and
then their count is recorded in the dataset's metadata; images on disk that
the CSV does not list are counted and reported; a corrupt PNG stops the build
with its path, and so does a decoding worker that dies (the OOM killer, a
crash in a decoder) instead of leaving the build waiting for it.

Decompression bombs: an image declaring more than MAX_IMAGE_PIXELS pixels
is refused from its header, before anything is decoded. The limit is raised
with `max_pixels` (`prepare --max_pixels`) or the environment variable
CXR_JAX_MAX_IMAGE_PIXELS, which `predict` honours too.

One source, one dataset: the dataset records its source (the metadata files'
SHA-256 digests, the image files' names and sizes) and how its PNGs are
stored. Preparing into the same `out` again reuses it when neither changed,
and otherwise rebuilds it, logging what changed; the copies of the metadata
files in `out` are written only after, so they always describe the records.
`out` has one writer at a time (a lock file), and folders left by a killed
build (`incomplete.*`) are removed, with a log line, by the next run.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import glob
import hashlib
import io
import json
import logging
import multiprocessing
import os
import shutil
import signal
import struct
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from PIL import Image

from cxr_jax import labels as L
from cxr_jax.data import metadata as M
from cxr_jax.preemption import FolderLock

log = logging.getLogger(__name__)

SPLIT = "images"          # one TFDS split; train/val/test are name lists
# The most pixels an image may declare: 8192 x 8192, several times a
# full-field radiograph (43 cm at 0.1 mm is 4,300 px a side), far below what
# a small file can declare.
MAX_IMAGE_PIXELS = 8192 * 8192
MAX_PIXELS_ENV = "CXR_JAX_MAX_IMAGE_PIXELS"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class PrepareError(ValueError):
  """Bad input to `prepare`; the message names the files."""


def find_images(manual_dir: str) -> dict[str, str]:
  """name -> path of every PNG under images/ or images_NNN/images/."""
  patterns = [os.path.join(manual_dir, "images", "*.png"),
              os.path.join(manual_dir, "images_*", "images", "*.png"),
              os.path.join(manual_dir, "images_*", "*.png")]
  found: dict[str, str] = {}
  for pattern in patterns:
    for path in sorted(glob.glob(pattern)):
      found.setdefault(os.path.basename(path), path)
  return found


@dataclasses.dataclass
class Source:
  """The images on disk (name -> path) and the record a dataset keeps of
  its source: the metadata files' digests, the image files' names and
  sizes (contents would mean reading every image on every run)."""

  on_disk: dict[str, str]
  record: dict[str, Any]


def scan_source(manual_dir: str) -> Source:
  on_disk = find_images(manual_dir)
  names, sizes = hashlib.sha256(), hashlib.sha256()
  for name in sorted(on_disk):
    names.update(name.encode() + b"\n")
    sizes.update(f"{name}\t{os.path.getsize(on_disk[name])}\n".encode())
  return Source(on_disk, {"files": M.digests(manual_dir),
                          "images": len(on_disk),
                          "image_names": names.hexdigest(),
                          "image_sizes": sizes.hexdigest()})


def source_changes(old: dict | None, new: dict) -> list[str]:
  """What differs between two source records; empty when they agree."""
  if not old:
    return ["it does not record its source (an older cxr-jax prepared it)"]
  changes = []
  old_files, new_files = old.get("files", {}), new["files"]
  for name in sorted(set(old_files) | set(new_files)):
    if name not in new_files:
      changes.append(f"{name} is gone")
    elif name not in old_files:
      changes.append(f"{name} is new")
    elif old_files[name] != new_files[name]:
      changes.append(f"{name} changed")
  if old.get("image_names") != new["image_names"]:
    changes.append(f"the image files are others ({old.get('images')} then, "
                   f"{new['images']} now)")
  elif old.get("image_sizes") != new["image_sizes"]:
    changes.append("image files changed size")
  return changes


def to_gray8(im: Image.Image) -> Image.Image:
  """Any PNG mode to 8-bit gray (see module docstring)."""
  if im.mode == "L":
    return im
  if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
    a = np.asarray(im, np.float64)
    lo, hi = float(a.min()), float(a.max())
    if hi <= 255 and lo >= 0:
      return Image.fromarray(a.astype(np.uint8), "L")
    scaled = (a - lo) / max(hi - lo, 1e-12) * 255.0
    return Image.fromarray(np.round(scaled).astype(np.uint8), "L")
  return im.convert("L")


def max_image_pixels(limit: int | None = None) -> int:
  """The pixel limit in force: `limit`, else $CXR_JAX_MAX_IMAGE_PIXELS, else
  MAX_IMAGE_PIXELS."""
  if limit is None:
    text = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not text:
      return MAX_IMAGE_PIXELS
    try:
      limit = int(text)
    except ValueError:
      raise PrepareError(f"{MAX_PIXELS_ENV}={text!r} is not a whole "
                         f"number") from None
  if limit < 1:
    raise PrepareError(f"the image pixel limit must be at least 1, got "
                       f"{limit}")
  return limit


def check_pixels(path: str, width: int, height: int,
                 limit: int | None = None) -> None:
  """Refuses an image declaring more than the limit's pixels, before it is
  decoded (a small file can declare gigabytes of pixels)."""
  limit = max_image_pixels(limit)
  if width * height > limit:
    raise PrepareError(
        f"{path} declares {width} x {height} = {width * height:,} pixels, "
        f"more than the limit of {limit:,} (a decompression bomb?); if the "
        f"film is real, raise the limit with --max_pixels or {MAX_PIXELS_ENV}")


def _png_size(head: bytes) -> tuple[int, int] | None:
  """(width, height) from a PNG's IHDR; None if `head` is not a PNG."""
  if len(head) < 24 or head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
    return None
  return struct.unpack(">II", head[16:24])


def _is_gray8_png(head: bytes) -> bool:
  """PNG signature and an IHDR of bit depth 8, colour type 0 (gray)."""
  return (_png_size(head) is not None and len(head) >= 26
          and head[24] == 8 and head[25] == 0)


def imagecodecs_or_none():
  """imagecodecs (libpng, faster than PIL both ways) when installed; a
  dependency of this package, but the PIL paths keep working without it."""
  try:
    import imagecodecs
  except ImportError:
    return None
  return imagecodecs


def gray8_pixels(data: bytes) -> np.ndarray | None:
  """uint8 [H, W] of an 8-bit gray PNG (nearly all of NIH, and every film
  `prepare` stores) through imagecodecs' libpng, ~20% faster than PIL's
  decoder; None when imagecodecs is absent."""
  codecs = imagecodecs_or_none()
  if codecs is None:
    return None
  pixels = codecs.png_decode(data)
  if pixels.ndim == 3:
    # A tRNS chunk makes libpng add an alpha channel; the gray is channel 0,
    # as PIL reads it.
    pixels = pixels[..., 0]
  return np.ascontiguousarray(pixels)


def _decode_gray8_fast(data: bytes) -> Image.Image | None:
  pixels = gray8_pixels(data)
  return None if pixels is None else Image.fromarray(pixels, "L")


def _decode_with_pil(path: str, data: bytes, limit: int) -> Image.Image:
  # PIL refuses images over twice its own limit when it opens them: ours,
  # checked first, is the one that decides.
  if limit > (Image.MAX_IMAGE_PIXELS or 0):
    Image.MAX_IMAGE_PIXELS = limit
  with Image.open(io.BytesIO(data)) as im:
    check_pixels(path, *im.size, limit)
    im.load()
    return to_gray8(im)


def load_gray(path: str, size: int | None = None,
              max_pixels: int | None = None
              ) -> tuple[Image.Image, tuple[int, int]]:
  """Decodes `path` to 8-bit gray, resized to size x size when given.

  Returns (image, (width, height) of the file). Raises PrepareError naming the
  file if it is corrupt or truncated, or declares more pixels than
  `max_image_pixels(max_pixels)`.
  """
  limit = max_image_pixels(max_pixels)
  try:
    with open(path, "rb") as f:
      data = f.read()
    png_size = _png_size(data[:33])
    if png_size is not None:
      check_pixels(path, *png_size, limit)
    gray = _decode_gray8_fast(data) if _is_gray8_png(data[:33]) else None
    if gray is None:
      gray = _decode_with_pil(path, data, limit)
  except PrepareError:
    raise
  except Exception as e:  # PIL and imagecodecs raise many kinds of errors
    raise PrepareError(f"cannot decode image {path}: {e}") from None
  original = gray.size
  if size is not None:
    gray = resize_gray(gray, size)
  return gray, original


def resize_gray(gray: Image.Image, size: int) -> Image.Image:
  """The one resampling every image goes through, in `prepare` and in
  `predict`, so that a single image meets the model as the training data did.
  """
  if gray.size == (size, size):
    return gray
  # An integer box reduction (1024 -> 341) then PIL's bilinear filter,
  # which widens with the scale: antialiased, and 4x cheaper than bicubic
  # on the full image.
  return gray.resize((size, size), Image.Resampling.BILINEAR,
                     reducing_gap=1.0)


def encode_resized(job: tuple[str, int, int, int | None]
                   ) -> tuple[bytes, tuple[int, int]]:
  """Worker: (path, size, PNG compression level, pixel limit) -> (PNG bytes
  of the resized gray image, (width, height) of the file)."""
  path, size, compression, max_pixels = job
  gray, original = load_gray(path, size, max_pixels)
  return encode_png(gray, compression), original


def encode_png(gray: Image.Image, compression: int) -> bytes:
  """PNG bytes of an 8-bit gray image.

  Level 0 stores the rows unfiltered: deflate without compression gains
  nothing from PNG's row filters, and undoing them (PIL picks one per row,
  Paeth among them) is most of libpng's decoding time, 82 against 49 us at
  299 px. Other levels keep PIL's adaptive filters, which shrink the file.
  """
  codecs = imagecodecs_or_none() if compression == 0 else None
  if codecs is not None:
    return codecs.png_encode(np.asarray(gray), level=0,
                             filter=codecs.PNG.FILTER.NONE)
  buf = io.BytesIO()
  gray.save(buf, format="PNG", compress_level=compression)
  return buf.getvalue()


def png_encoding(compression: int) -> str:
  """How `encode_png` stores films at this level, recorded with the dataset:
  preparing again with another encoding rebuilds it."""
  unfiltered = compression == 0 and imagecodecs_or_none() is not None
  return (f"level {compression}, "
          f"{'unfiltered' if unfiltered else 'adaptively filtered'} rows")


# TFDS writes ArrayRecord's default, zstd on each record. On level-0 PNGs
# (stored, not deflated) that saves about a quarter of the disk but costs the
# reader more than the PNG decode itself, and on deflated PNGs it saves
# nothing (benchmarks/RESULTS.md, data.py): so records are stored as they
# are, and the PNG level alone trades size against speed.
RECORD_OPTIONS = "group_size:1,uncompressed"
_UNCOMPRESSING = ".uncompressing"


def _copy_uncompressed(arm, reader, copy: str) -> None:
  """Writes every record of `reader` into a new ArrayRecord file `copy`,
  uncompressed, and reads the count back; array_record's RuntimeError on
  any failure (a full disk, an unreadable record)."""
  n = reader.num_records()
  writer = arm.ArrayRecordWriter(copy, RECORD_OPTIONS)
  try:
    for start in range(0, n, 256):
      for record in reader.read(range(start, min(start + 256, n))):
        writer.write(record)
  finally:
    writer.close()
  check, written = arm.ArrayRecordReader(copy), 0
  if check.ok():
    written = check.num_records()
    check.close()
  if written != n:
    raise RuntimeError(f"{written} of {n} records read back")


def store_records_uncompressed(path: str) -> int:
  """Rewrites the ArrayRecord shards of the prepared dataset at `path` whose
  records are compressed, record for record; returns how many it rewrote.

  Each shard is written beside itself, read back and only then renamed over
  it, so a failed or killed rewrite leaves the old shard whole (a killed
  one's leftover is removed by the next run); readers that hold the old
  file open keep reading it.
  """
  from array_record.python import array_record_module as arm
  for left in glob.glob(os.path.join(path, "*" + _UNCOMPRESSING)):
    os.remove(left)
  rewritten = 0
  for shard in sorted(glob.glob(os.path.join(
      path, "*.array_record-[0-9]*-of-[0-9]*"))):
    reader = arm.ArrayRecordReader(shard)
    options = reader.writer_options_string() if reader.ok() else None
    if options is None:  # (a reader that failed cannot even be closed)
      raise PrepareError(f"{shard} is not a readable ArrayRecord file: "
                         f"remove {path} and prepare again")
    copy = shard + _UNCOMPRESSING
    try:
      if "uncompressed" in options.split(","):
        continue
      _copy_uncompressed(arm, reader, copy)
    except RuntimeError as e:
      if os.path.exists(copy):
        os.remove(copy)
      raise PrepareError(f"{shard}: storing its records uncompressed "
                         f"failed, the shard is unchanged: {e}") from None
    finally:
      reader.close()
    os.replace(copy, shard)
    rewritten += 1
  return rewritten


# Each decoding worker's slot in a shared array: the index of the job it is
# decoding, or -1. A worker that dies leaves its job there.
_worker_slot: tuple[Any, int] | None = None


def _start_worker(slots, next_slot) -> None:
  global _worker_slot
  with next_slot.get_lock():
    _worker_slot = (slots, next_slot.value)
    next_slot.value += 1

  def leave(signum, frame):
    # The pool stops its other workers when one dies: they clear their slot
    # on the way out, so the job left is the dead worker's.
    del signum, frame
    slots[_worker_slot[1]] = -1
    os._exit(1)

  signal.signal(signal.SIGTERM, leave)


def _decode_chunk(fn: Callable, first: int, jobs: Sequence) -> list:
  slots, slot = _worker_slot
  out = []
  for i, job in enumerate(jobs):
    slots[slot] = first + i
    try:
      out.append(fn(job))
    finally:
      slots[slot] = -1
  return out


def _worker_died(jobs: Sequence[tuple], slots) -> PrepareError:
  lost = [jobs[i][0] for i in slots if i >= 0]
  return PrepareError(
      f"a decoding worker died (killed by the system, e.g. out of memory, or "
      f"crashed in a decoder) while decoding "
      f"{' or '.join(lost) if lost else 'an unknown file'}; check that file, "
      f"or use fewer --workers")


def decode_all(jobs: Sequence[tuple], workers: int,
               fn: Callable | None = None, chunk: int = 8) -> Iterator:
  """`fn(job)` for each job (default `encode_resized`, whose first field is
  the path) in a pool of `workers` processes, in order, with a bounded
  number of chunks in flight. A worker that dies raises PrepareError naming
  the file it was decoding."""
  fn = fn or encode_resized
  ctx = multiprocessing.get_context("spawn")
  slots = ctx.Array("q", [-1] * workers, lock=False)
  pool = concurrent.futures.ProcessPoolExecutor(
      workers, mp_context=ctx, initializer=_start_worker,
      initargs=(slots, ctx.Value("i", 0)))
  pending: collections.deque = collections.deque()
  starts = iter(range(0, len(jobs), chunk))
  try:
    while True:
      try:
        while len(pending) < 4 * workers:
          first = next(starts, None)
          if first is None:
            break
          pending.append(pool.submit(_decode_chunk, fn, first,
                                     jobs[first:first + chunk]))
        if not pending:
          return
        results = pending.popleft().result()
      except concurrent.futures.process.BrokenProcessPool:
        # Once the pool has stopped every worker, the slots are final.
        pool.shutdown(wait=True, cancel_futures=True)
        raise _worker_died(jobs, slots) from None
      yield from results
  finally:
    pool.shutdown(wait=True, cancel_futures=True)


def _tfds():
  import tensorflow_datasets as tfds
  return tfds


@functools.lru_cache(maxsize=None)
def make_builder_class():
  """The TFDS builder classes, built once and lazily: importing TFDS is slow,
  and TFDS refuses to register a dataset name twice."""
  tfds = _tfds()

  class Chestxray14Config(tfds.core.BuilderConfig):

    def __init__(self, *, image_size: int = 299, **kwargs):
      super().__init__(name=f"{image_size}px",
                       description=f"8-bit gray, {image_size}x{image_size}",
                       **kwargs)
      self.image_size = image_size

  class Chestxray14(tfds.core.GeneratorBasedBuilder):
    """NIH ChestX-ray14 (Wang et al. 2017), 14 labels + normal, with boxes."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download ChestX-ray14 from the NIH (images_001.tar.gz ... "
        "images_012.tar.gz, Data_Entry_2017*.csv, BBox_List_2017.csv, "
        "train_val_list.txt, test_list.txt) and unpack it into one folder: "
        "images/ (or images_0NN/images/) beside the CSVs.")

    def __init__(self, *, source: Source | None = None,
                 allow_missing: bool = False, workers: int | None = None,
                 png_compression: int = 0, max_pixels: int | None = None,
                 **kwargs):
      self._source = source
      self._allow_missing = allow_missing
      self._png_compression = png_compression
      self._max_pixels = max_pixels
      self._workers = workers or os.cpu_count() or 1
      super().__init__(**kwargs)

    def _info(self):
      size = self.builder_config.image_size
      return tfds.core.DatasetInfo(
          builder=self,
          description=self.__doc__,
          features=tfds.features.FeaturesDict({
              "image": tfds.features.Image(shape=(size, size, 1),
                                           encoding_format="png"),
              "name": tfds.features.Text(),
              "labels": tfds.features.Tensor(shape=(L.NUM_DISEASES,),
                                             dtype=np.uint8),
              "normal": tfds.features.Tensor(shape=(), dtype=np.bool_),
              "patient_id": tfds.features.Tensor(shape=(), dtype=np.int64),
              "view": tfds.features.Text(),
              # (width, height) of the source PNG: boxes are in its pixels.
              "source_size": tfds.features.Tensor(shape=(2,), dtype=np.int32),
              "boxes": tfds.features.Sequence({
                  "label": tfds.features.Tensor(shape=(), dtype=np.int32),
                  "xywh": tfds.features.Tensor(shape=(4,), dtype=np.float32),
              }),
          }),
          metadata=tfds.core.MetadataDict(),
          # Written in generation order: record i is metadata['names'][i].
          disable_shuffling=True,
          homepage="https://nihcc.app.box.com/v/ChestXray-NIHCC",
      )

    def _split_generators(self, dl_manager):
      manual_dir = os.fspath(dl_manager.manual_dir)
      meta = M.read_all(manual_dir)
      source = self._source or scan_source(manual_dir)
      on_disk = source.on_disk
      listed = set(meta.entries.names.tolist())
      missing = sorted(listed - set(on_disk))
      unlisted = sorted(set(on_disk) - listed)
      if missing and not self._allow_missing:
        raise PrepareError(
            f"{len(missing)} of {len(listed)} images listed in "
            f"{os.path.basename(meta.entries.source)} are not on disk under "
            f"{manual_dir} (first: {', '.join(missing[:5])}); pass "
            f"--allow_missing to build from the {len(listed) - len(missing)} "
            f"present")
      if missing:
        log.warning("skipping %d listed images that are not on disk "
                    "(first: %s)", len(missing), ", ".join(missing[:5]))
      if unlisted:
        log.warning("%d images on disk are not in the CSV and are not "
                    "included (first: %s)", len(unlisted),
                    ", ".join(unlisted[:5]))
      present = sorted(listed & set(on_disk))
      if not present:
        raise PrepareError(f"no image listed in the CSV was found under "
                           f"{manual_dir}/images")
      self.info.metadata.update({
          "names": present,
          "num_listed": len(listed),
          "num_missing_skipped": len(missing),
          "missing_examples": missing[:20],
          "num_unlisted_on_disk": len(unlisted),
          "unlisted_examples": unlisted[:20],
          "image_size": self.builder_config.image_size,
          "source_csv": os.path.basename(meta.entries.source),
          "source": source.record,
          "png_encoding": png_encoding(self._png_compression),
      })
      self._manual_meta = meta
      return {SPLIT: self._generate_examples(present, on_disk, meta)}

    def _generate_examples(self, present, on_disk, meta):
      size = self.builder_config.image_size
      index = meta.entries.index
      boxes = meta.boxes.for_image() if meta.boxes is not None else {}
      jobs = [(on_disk[n], size, self._png_compression, self._max_pixels)
              for n in present]
      for name, (png, source_size) in zip(present,
                                          decode_all(jobs, self._workers)):
        row = index[name]
        yield name, {
            "image": png,
            "name": name,
            "labels": meta.entries.labels[row],
            "normal": bool(meta.entries.normal[row]),
            "patient_id": int(meta.entries.patient_id[row]),
            "view": str(meta.entries.view[row]),
            "source_size": np.array(source_size, np.int32),
            "boxes": [{"label": lab, "xywh": xywh}
                      for lab, xywh in boxes.get(name, [])],
        }

  return Chestxray14, Chestxray14Config


def _recorded(dataset_path: str) -> dict:
  """The metadata a prepared dataset folder records (empty if unreadable)."""
  try:
    with open(os.path.join(dataset_path, "metadata.json")) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def _prepared_folders(out: str) -> list[str]:
  return sorted(os.path.dirname(p) for p in glob.glob(
      os.path.join(out, "chestxray14", "*px", "*", "dataset_info.json")))


def _remove_incomplete(out: str) -> None:
  """Removes what killed builds left (TFDS writes into `incomplete.*` and
  renames it when done); the folder's lock guarantees none is in progress."""
  for path in sorted(glob.glob(os.path.join(out, "chestxray14", "*",
                                            "incomplete.*"))):
    log.warning("removing %s, left by a build that did not finish", path)
    shutil.rmtree(path, ignore_errors=True)


def _copy_metadata(data_dir: str, out: str) -> None:
  """Copies of the metadata files, so splits and evaluation need only `out`;
  copies of files the source no longer has are removed."""
  meta_dir = os.path.join(out, M.METADATA_DIR)
  os.makedirs(meta_dir, exist_ok=True)
  copied = set()
  for src in M.metadata_files(data_dir):
    shutil.copy2(src, meta_dir)
    copied.add(os.path.basename(src))
  known = {name + ext for group in M.METADATA_FILES for name in group
           for ext in ("", ".gz")}
  for name in sorted(set(os.listdir(meta_dir)) & known - copied):
    os.remove(os.path.join(meta_dir, name))


def prepare(data_dir: str, out: str, image_size: int = 299,
            allow_missing: bool = False, workers: int | None = None,
            png_compression: int = 0, max_pixels: int | None = None
            ) -> dict[str, Any]:
  """Builds the dataset into `out`; returns a summary with every count, and
  under 'rebuilt' what had changed if an older build was replaced.

  `png_compression` 0 (the default) stores deflate-free PNGs with unfiltered
  rows: about 88 KB an image at 299 px (~10 GB for all 112,120) against
  ~41 KB at level 1, but much faster to write and to decode at train time,
  where the CPU must keep an accelerator fed. A dataset stored at another
  level is rebuilt. `max_pixels` raises (or lowers) the pixel limit.
  """
  if not os.path.isdir(data_dir):
    raise FileNotFoundError(f"NIH folder not found: {data_dir}")
  if os.path.exists(out) and not os.path.isdir(out):
    raise PrepareError(f"--out {out} is a file, not a folder")
  M.find_file(data_dir, M.DATA_ENTRY_NAMES)  # fail early, naming the folder
  max_image_pixels(max_pixels)  # and on a bad limit
  tfds = _tfds()
  builder_cls, config_cls = make_builder_class()
  with FolderLock(out, "prepare"):
    _remove_incomplete(out)
    source = scan_source(data_dir)
    options = dict(config=config_cls(image_size=image_size), data_dir=out,
                   file_format="array_record", source=source,
                   allow_missing=allow_missing, workers=workers,
                   png_compression=png_compression, max_pixels=max_pixels)
    builder = builder_cls(**options)
    path = os.fspath(builder.data_path)
    changes = []
    reused = os.path.exists(os.path.join(path, "dataset_info.json"))
    if reused:
      recorded = _recorded(path)
      changes = source_changes(recorded.get("source"), source.record)
      stored = recorded.get("png_encoding",
                            "from an older cxr-jax, with filtered rows")
      asked = png_encoding(png_compression)
      if stored != asked:
        changes.append(f"its PNGs are {stored} ({asked} asked for)")
      if changes:
        log.warning("rebuilding %s: %s", path, "; ".join(changes))
        shutil.rmtree(path)
        builder = builder_cls(**options)  # the first read the old info
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=data_dir))
    # Also converts, once, a dataset prepared before records were stored
    # uncompressed: the same records, so nothing else needs rebuilding.
    shards = store_records_uncompressed(path)
    if shards and not changes and reused:
      log.warning("stored the records of %s uncompressed (%d shards), as "
                  "this cxr-jax prepares them: the same records, faster "
                  "to read", path, shards)
    _copy_metadata(data_dir, out)
    for other in _prepared_folders(out):  # other sizes
      stale = source_changes(_recorded(other).get("source"),
                             source.record)
      if stale:
        log.warning("%s was prepared from another source (%s) than the "
                    "metadata copies in %s now describe: prepare it again, "
                    "or remove it", other, "; ".join(stale), out)
  md = builder.info.metadata
  return {"dir": os.fspath(builder.data_dir), "images": len(md["names"]),
          "listed": md["num_listed"],
          "missing_skipped": md["num_missing_skipped"],
          "unlisted_on_disk": md["num_unlisted_on_disk"],
          "image_size": image_size, "rebuilt": changes}
