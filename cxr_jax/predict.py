"""`cxr-jax predict`: a trained run on films one at a time.

Reads PNG and JPEG of any mode and size (16-bit, RGB, RGBA, palette) and
DICOM through pydicom: the modality LUT (rescale slope/intercept), then the
VOI LUT or window, then MONOCHROME1 films are inverted so that bone is bright
as in the training data. Every film then goes through `prepare`'s own gray
conversion and resampling, so it meets the model as the training data did.

A file that cannot be read is reported by name; the others still get their
predictions.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
from PIL import Image

from cxr_jax import cam, inference
from cxr_jax import labels as L
from cxr_jax.data import tfds_builder

DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")


class ImageReadError(ValueError):
  """A film that cannot be decoded; the message names the file."""


def _is_dicom(path: str, head: bytes) -> bool:
  return (path.lower().endswith(DICOM_SUFFIXES) or
          (len(head) >= 132 and head[128:132] == b"DICM"))


def dicom_to_gray8(path: str, max_pixels: int | None = None) -> Image.Image:
  """A DICOM film to 8-bit gray, displayed as a radiologist would see it.
  A film declaring more than `tfds_builder.max_image_pixels(max_pixels)`
  pixels is refused before its pixel data is decoded."""
  try:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut
  except ImportError as e:
    raise ImageReadError(f"{path}: reading DICOM needs pydicom ({e})") from None
  try:
    ds = pydicom.dcmread(path)
  except Exception as e:
    raise ImageReadError(f"{path}: not a readable DICOM file: {e}") from None
  if "PixelData" not in ds:
    raise ImageReadError(f"{path}: the DICOM file holds no pixel data")
  try:
    tfds_builder.check_pixels(path, int(ds.get("Columns", 0)),
                              int(ds.get("Rows", 0)), max_pixels)
  except tfds_builder.PrepareError as e:
    raise ImageReadError(str(e)) from None
  if int(ds.get("NumberOfFrames", 1) or 1) > 1:
    raise ImageReadError(f"{path}: a multi-frame DICOM "
                         f"({ds.NumberOfFrames} frames); expected one film")
  try:
    pixels = ds.pixel_array
  except Exception as e:
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "?")
    raise ImageReadError(f"{path}: cannot decode its pixel data (transfer "
                         f"syntax {syntax}): {e}") from None
  photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
  if photometric not in ("MONOCHROME1", "MONOCHROME2"):
    if pixels.ndim == 3 and pixels.shape[-1] == 3:
      return Image.fromarray(np.asarray(pixels, np.uint8), "RGB").convert("L")
    raise ImageReadError(f"{path}: unsupported PhotometricInterpretation "
                         f"{photometric!r}")
  try:
    values = apply_modality_lut(pixels, ds).astype(np.float64)
    values = np.asarray(apply_voi_lut(values, ds, index=0), np.float64)
  except Exception as e:  # a corrupt rescale or window tag, as pydicom reads it
    raise ImageReadError(f"{path}: cannot apply its rescale or window "
                         f"(a damaged tag?): {type(e).__name__}: "
                         f"{e}") from None
  lo, hi = float(values.min()), float(values.max())
  if photometric == "MONOCHROME1":  # low values are bright: invert
    values = lo + hi - values
  scaled = (values - lo) / max(hi - lo, 1e-12) * 255.0
  return Image.fromarray(np.round(scaled).astype(np.uint8), "L")


def read_film(path: str, size: int, max_pixels: int | None = None
              ) -> np.ndarray:
  """Any supported file -> uint8 [size, size, 1], as `prepare` stores it;
  `max_pixels` as in `tfds_builder.load_gray`."""
  try:
    with open(path, "rb") as f:
      head = f.read(132)
  except OSError as e:
    raise ImageReadError(f"{path}: {e.strerror or e}") from None
  if _is_dicom(path, head):
    gray = tfds_builder.resize_gray(dicom_to_gray8(path, max_pixels), size)
  else:
    try:
      gray, _ = tfds_builder.load_gray(path, size, max_pixels)
    except tfds_builder.PrepareError as e:
      raise ImageReadError(str(e)) from None
  return np.asarray(gray, np.uint8)[..., None]


def predict_files(workdir: str, paths: Sequence[str], which: str = "best",
                  cam_dir: str | None = None, top: int = 3,
                  threshold: int = 200, max_pixels: int | None = None
                  ) -> dict[str, Any]:
  """{'results': [{image, probabilities, top[, cams]}], 'errors': [{image,
  error}], 'step'}; results keep the order of `paths`. A film declaring more
  pixels than `max_pixels` (see `tfds_builder.max_image_pixels`) is an error
  of that film."""
  cam.check_threshold(threshold)
  tfds_builder.max_image_pixels(max_pixels)  # a bad limit fails once, here
  predictor = inference.Predictor(workdir, which)
  films, readable, errors = [], [], []
  for path in paths:
    try:
      films.append(read_film(path, predictor.size, max_pixels))
      readable.append(path)
    except ImageReadError as e:
      errors.append({"image": path, "error": str(e)})
  results = []
  if readable:
    probs, class_maps = predictor(np.stack(films))
    stems = _overlay_stems(readable)
    if cam_dir:
      os.makedirs(cam_dir, exist_ok=True)
    for i, path in enumerate(readable):
      order = np.argsort(-probs[i])[:top]
      entry = {"image": path,
               "probabilities": {d: float(p) for d, p in
                                 zip(L.DISEASES, probs[i])},
               "top": [L.DISEASES[c] for c in order]}
      if cam_dir:
        entry["cams"] = {}
        for c in order:
          heat, box = cam.cam_box(class_maps[i, ..., c], predictor.size,
                                  predictor.grid, threshold)
          out = os.path.join(
              cam_dir, f"{stems[i]}_{L.DISEASES[c].replace(' ', '_')}.png")
          cam.overlay(films[i][..., 0], heat, None, box, out,
                      f"{os.path.basename(path)}: {L.DISEASES[c]} "
                      f"p={probs[i, c]:.3f}")
          entry["cams"][L.DISEASES[c]] = {"overlay": out, "box": box}
      results.append(entry)
  return {"results": results, "errors": errors, "step": predictor.step}


def _overlay_stems(paths: Sequence[str]) -> list[str]:
  """File stems for the overlays, made unique: `a/dup.png` and `b/dup.png`
  become `dup` and `dup_2` rather than one overwriting the other."""
  seen: dict[str, int] = {}
  stems = []
  for path in paths:
    stem = os.path.splitext(os.path.basename(path))[0]
    seen[stem] = seen.get(stem, 0) + 1
    stems.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
  return stems


def format_table(results: Sequence[dict[str, Any]]) -> str:
  """Rows: the 14 diseases; one column per image."""
  if not results:
    return ""
  heads = [os.path.basename(r["image"])[-16:] for r in results]
  width = max(8, *(len(h) for h in heads))
  lines = [f"{'Pathology':20s} " + " ".join(f"{h:>{width}s}" for h in heads)]
  for d in L.DISEASES:
    lines.append(f"{d:20s} " + " ".join(
        f"{r['probabilities'][d]:>{width}.4f}" for r in results))
  return "\n".join(lines)
