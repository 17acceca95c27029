"""`cxr-jax prepare`: the NIH layout into a TFDS dataset of ArrayRecord files.

The builder reads the official layout from a manual directory (`images/` or
`images_0NN/images/` subfolders beside the CSVs), decodes each PNG to 8-bit
gray, resizes it with antialiasing to `image_size` and stores PNG bytes, so
TFDS needs no TensorFlow to write it (it never sees a numpy image). Decoding
runs in a process pool on all cores; records are written in image-name order
(DatasetInfo's `disable_shuffling`), so record i is `metadata['names'][i]`.

Gray conversion: L as is; RGB/RGBA/LA (R=G=B in NIH's RGBA files), palette
and 1-bit through PIL's luminance; 16-bit and float images are stretched from
their own min..max to 0..255 (their bit depth is not recorded in the file).

Nothing is dropped silently: images listed in the CSV but absent stop the
build (naming the count and the first names) unless `allow_missing`, and
then their count is recorded in the dataset's metadata; images on disk that
the CSV does not list are counted and reported; a corrupt PNG stops the build
with its path.
"""

from __future__ import annotations

import functools
import glob
import io
import logging
import multiprocessing
import os
import shutil
from typing import Any

import numpy as np
from PIL import Image

from cxr_jax import labels as L
from cxr_jax.data import metadata as M

log = logging.getLogger(__name__)

SPLIT = "images"          # one TFDS split; train/val/test are name lists


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


def _is_gray8_png(head: bytes) -> bool:
  """PNG signature and an IHDR of bit depth 8, colour type 0 (gray)."""
  return (head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
          and head[24] == 8 and head[25] == 0)


def _decode_gray8_fast(data: bytes) -> Image.Image | None:
  """8-bit gray PNGs (nearly all of NIH) through imagecodecs' libpng, ~20%
  faster than PIL's decoder; None when imagecodecs is absent."""
  try:
    import imagecodecs
  except ImportError:
    return None
  return Image.fromarray(np.ascontiguousarray(imagecodecs.png_decode(data)),
                         "L")


def load_gray(path: str, size: int | None = None) -> tuple[Image.Image,
                                                            tuple[int, int]]:
  """Decodes `path` to 8-bit gray, resized to size x size when given.

  Returns (image, (width, height) of the file). Raises PrepareError naming the
  file if it is corrupt or truncated.
  """
  try:
    with open(path, "rb") as f:
      data = f.read()
    gray = _decode_gray8_fast(data) if _is_gray8_png(data[:33]) else None
    if gray is None:
      with Image.open(io.BytesIO(data)) as im:
        im.load()
        gray = to_gray8(im)
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


def encode_resized(job: tuple[str, int, int]
                   ) -> tuple[bytes, tuple[int, int]]:
  """Worker: (path, size, PNG compression level) -> (PNG bytes of the resized
  gray image, (width, height) of the file)."""
  path, size, compression = job
  gray, original = load_gray(path, size)
  buf = io.BytesIO()
  gray.save(buf, format="PNG", compress_level=compression)
  return buf.getvalue(), original


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

    def __init__(self, *, allow_missing: bool = False,
                 workers: int | None = None, png_compression: int = 0,
                 **kwargs):
      self._allow_missing = allow_missing
      self._png_compression = png_compression
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
      on_disk = find_images(manual_dir)
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
      })
      self._manual_meta = meta
      return {SPLIT: self._generate_examples(present, on_disk, meta)}

    def _generate_examples(self, present, on_disk, meta):
      size = self.builder_config.image_size
      index = meta.entries.index
      boxes = meta.boxes.for_image() if meta.boxes is not None else {}
      jobs = [(on_disk[n], size, self._png_compression) for n in present]
      ctx = multiprocessing.get_context("spawn")
      with ctx.Pool(self._workers) as pool:
        for name, (png, source_size) in zip(
            present, pool.imap(encode_resized, jobs, chunksize=8)):
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


def prepare(data_dir: str, out: str, image_size: int = 299,
            allow_missing: bool = False, workers: int | None = None,
            png_compression: int = 0) -> dict[str, Any]:
  """Builds the dataset into `out`; returns a summary with every count.

  `png_compression` 0 (the default) stores deflate-free PNGs: about 88 KB an
  image at 299 px (~10 GB for all 112,120) against ~41 KB at level 1, but
  twice as fast to write and to decode at train time, where the CPU must keep
  an accelerator fed.
  """
  if not os.path.isdir(data_dir):
    raise FileNotFoundError(f"NIH folder not found: {data_dir}")
  M.find_file(data_dir, M.DATA_ENTRY_NAMES)  # fail early, naming the folder
  tfds = _tfds()
  builder_cls, config_cls = make_builder_class()
  builder = builder_cls(config=config_cls(image_size=image_size),
                        data_dir=out, file_format="array_record",
                        allow_missing=allow_missing, workers=workers,
                        png_compression=png_compression)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=data_dir))
  # Copies of the metadata files, so splits and evaluation need only `out`.
  meta_dir = os.path.join(out, M.METADATA_DIR)
  os.makedirs(meta_dir, exist_ok=True)
  for names in (M.DATA_ENTRY_NAMES, [M.BBOX_NAME], [M.TRAIN_VAL_LIST],
                [M.TEST_LIST]):
    try:
      src = M.find_file(data_dir, names)
    except FileNotFoundError:
      continue
    shutil.copy2(src, meta_dir)
  md = builder.info.metadata
  return {"dir": os.fspath(builder.data_dir), "images": len(md["names"]),
          "listed": md["num_listed"],
          "missing_skipped": md["num_missing_skipped"],
          "unlisted_on_disk": md["num_unlisted_on_disk"],
          "image_size": image_size}
