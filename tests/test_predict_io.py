"""Reading single films for `cxr-jax predict`: DICOM display pipeline, any
PNG/JPEG mode, real NIH files, and errors that name the file."""

import numpy as np
import pytest
from PIL import Image

from conftest import write_dicom
from cxr_jax import predict
from cxr_jax.data import tfds_builder


def _gray_ramp(size=64):
  g = np.tile(np.linspace(0, 255, size).round().astype(np.uint8), (size, 1))
  g[: size // 2] = g[: size // 2, ::-1]  # not separable, not symmetric
  return g


def test_dicom_monochrome1_is_inverted_after_the_modality_lut(tmp_path):
  g = _gray_ramp()
  # MONOCHROME1: bright bone is stored low. Rescale maps raw to "HU-like".
  write_dicom(tmp_path / "m1.dcm", 4000 - 15 * g.astype(np.int64),
              "MONOCHROME1", slope=2.0, intercept=-1024.0)
  got = np.asarray(predict.dicom_to_gray8(str(tmp_path / "m1.dcm")))
  np.testing.assert_allclose(got.astype(int), g.astype(int), atol=1)
  write_dicom(tmp_path / "m2.dcm", 100 + 15 * g.astype(np.int64),
              "MONOCHROME2")
  got = np.asarray(predict.dicom_to_gray8(str(tmp_path / "m2.dcm")))
  np.testing.assert_allclose(got.astype(int), g.astype(int), atol=1)


def test_dicom_window_is_applied(tmp_path):
  g = _gray_ramp()
  stored = 100 + 15 * g.astype(np.int64)  # modality values 100..3925
  # A window over the middle half of the range: outside it saturates.
  lo, hi = 100 + 15 * 64, 100 + 15 * 192
  write_dicom(tmp_path / "w.dcm", stored, "MONOCHROME2",
              window=((lo + hi) / 2, hi - lo))
  got = np.asarray(predict.dicom_to_gray8(str(tmp_path / "w.dcm")), int)
  want = np.clip((g.astype(float) - 64) / 128, 0, 1) * 255
  assert np.abs(got - want).max() <= 3
  assert (got[g <= 60] == 0).all() and (got[g >= 196] == 255).all()


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "I;16", "P", "LA"])
def test_png_and_jpeg_of_any_mode(tmp_path, mode):
  g = _gray_ramp(120)
  im = Image.fromarray(g, "L")
  if mode == "I;16":
    im = Image.fromarray(g.astype(np.uint16) * 257)  # 16-bit gray
  else:
    im = im.convert(mode)
  im.save(tmp_path / "f.png")
  got = predict.read_film(str(tmp_path / "f.png"), 80)
  want = np.asarray(tfds_builder.resize_gray(Image.fromarray(g, "L"), 80))
  assert got.shape == (80, 80, 1) and got.dtype == np.uint8
  assert np.abs(got[..., 0].astype(int) - want).max() <= 1
  if mode in ("L", "RGB"):
    im.save(tmp_path / "f.jpg", quality=95)
    got = predict.read_film(str(tmp_path / "f.jpg"), 80)
    assert np.abs(got[..., 0].astype(float) - want).mean() < 3


def test_unreadable_files_are_named(tmp_path):
  (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
  (tmp_path / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"junk")
  for name in ("broken.png", "broken.dcm", "absent.png"):
    with pytest.raises(predict.ImageReadError, match=name):
      predict.read_film(str(tmp_path / name), 80)


def test_real_nih_films_including_rgba(nih_sample):
  paths = sorted((nih_sample / "images").glob("*.png"))
  assert len(paths) == 40
  rgba = 0
  for p in paths:
    film = predict.read_film(str(p), 128)
    with Image.open(p) as im:
      rgba += im.mode == "RGBA"
      want = np.asarray(tfds_builder.resize_gray(im.convert("L"), 128))
    assert film.shape == (128, 128, 1)
    np.testing.assert_array_equal(film[..., 0], want)
  assert rgba == 2
