"""Test set-up and the helpers several test modules share.

8 fake CPU devices and Keras on JAX are set before anything imports jax.
The helpers (a small network with the full model interface, configs,
random batches, a few training steps) are importable as `conftest` by the
scripts that tests run in subprocesses, which put this folder on sys.path.
"""

import atexit
import os
import pathlib
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the session and the CLI runs it
# starts: tests build the same programs again and again (a new Trainer per
# test, the same step in a subprocess), and a cached executable is the one
# that was compiled, so no exactness check changes.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(
      prefix="cxr_jax_test_xla_cache_")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"],
                  ignore_errors=True)
XLA_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"]

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_compilation_cache_dir", XLA_CACHE)  # if jax came first

from cxr_jax import train  # noqa: E402
from cxr_jax.config import load_config  # noqa: E402
from cxr_jax.models import common  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SAMPLE = SHARED / "data" / "chestxray14_sample"


@pytest.fixture(scope="session")
def nih_sample() -> pathlib.Path:
  """The real ChestX-ray14 sample beside the checkout (CI has it; users don't)."""
  if not (SAMPLE / "Data_Entry_2017_v2020.csv.gz").exists():
    pytest.skip(f"real ChestX-ray14 sample not found at {SAMPLE}")
  return SAMPLE


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> str:
  """A prepared synthetic dataset of 160 films at 75 px (with boxes)."""
  from cxr_jax.data import synthetic, tfds_builder
  root = tmp_path_factory.mktemp("tiny")
  synthetic.synthesize(str(root / "nih"), num_images=160, image_size=96,
                       seed=3, workers=2)
  tfds_builder.prepare(str(root / "nih"), str(root / "prepared"),
                       image_size=75, workers=2)
  return str(root / "prepared")


def pytest_collection_modifyitems(config, items):
  """Under pytest-xdist (`-n 2`; `--dist loadfile` is in pyproject's
  addopts) each test file runs on one worker, so a module-scoped fixture
  (the trained demo run, a Keras reference network) is built once. Files
  are dealt in the order their first test appears: slow tests first, so the
  long files start at once and the workers finish together."""
  if hasattr(config, "workerinput"):  # an xdist worker
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


class SmallNet(nn.Module):
  """Conv + synchronised BatchNorm + the shared head: InceptionV3's
  collectives and the whole model interface (class maps, feature grid) at a
  fraction of its compile time."""

  num_classes: int = 15
  dtype: common.Dtype = jnp.float32
  bn_axis_name: str | None = None
  bn_momentum: float = 0.9
  head_pooling: str = "avg"
  lse_r: float = common.LSE_R
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False):
    x = x.astype(self.dtype)
    for features in (8, 16):
      x = nn.Conv(features, (3, 3), strides=(2, 2), padding="VALID",
                  use_bias=False, dtype=self.dtype)(x)
      # The backbones' BatchNorm, so the N-device tests cover its gradient.
      x = common.batch_norm(train, epsilon=1e-3, momentum=self.bn_momentum,
                            axis_name=self.bn_axis_name, dtype=self.dtype,
                            use_scale=False, name=None)(x)
      x = nn.relu(x)
    logits, out = common.classifier_head(
        x, num_classes=self.num_classes, pooling=self.head_pooling,
        lse_r=self.lse_r, dropout_rate=self.dropout_rate, train=train,
        class_maps=return_features)
    return (logits, out) if return_features else logits

  def feature_grid(self, size: int):
    return common.grid_geometry(size, [(3, 2, "VALID"), (3, 2, "VALID")])


def small_model(config, axis_name):
  return SmallNet(bn_axis_name=axis_name if config.sync_batch_stats else None)


def train_config(**overrides):
  """configs/tiny.py made for exactness tests; keys of config.model may be
  given as model__KEY."""
  c = load_config(str(ROOT / "configs" / "tiny.py"))
  # SGD: Adam and Adadelta divide by |g|, which turns float rounding in
  # near-zero gradients into sign flips; a linear update can be compared to
  # float32 tolerance.
  c.optimizer, c.learning_rate = "sgd", 0.05
  c.image_size, c.batch_size = 75, 16
  c.loss = "cw_cel_fine_grained"  # per-class counts: the strictest case
  for k, v in overrides.items():
    if k.startswith("model__"):
      c.model[k[len("model__"):]] = v
    else:
      c[k] = v
  return c


def random_batches(n=3, size=75, batch=16, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    labels = (rng.random((batch, 15)) < 0.2).astype(np.float32)
    out.append({"image": rng.integers(0, 256, (batch, size, size, 1)).astype(
        np.uint8), "labels": labels, "mask": np.ones(batch, np.float32)})
  return out


def random_variables(model, size: int = 64, seed: int = 0):
  """Variables of `model`'s shapes at `size` px, drawn by numpy: for tests of
  what a network computes from any weights. Compiling a deep network's
  `init` (a PRNG draw per parameter) costs several times its forward pass."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == "kernel":  # fan-in scaled, so activations stay finite
      # A scanned group's conv kernels lead with the block axis (5-d).
      fan_in = np.prod(leaf.shape[-4:-1] if leaf.ndim >= 4 else
                       leaf.shape[:-1])
      return rng.normal(0, fan_in ** -0.5, leaf.shape)
    if name in ("scale", "var"):
      return rng.uniform(0.5, 1.5, leaf.shape)
    return rng.normal(0, 0.1, leaf.shape)  # biases, BatchNorm means

  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, size, size, 3))))
  return jax.tree_util.tree_map_with_path(
      lambda p, leaf: draw(p, leaf).astype(leaf.dtype), shapes)


def run_steps(config, num_devices, batches, model_fn=small_model,
              variables=None):
  """(losses, parameter updates, batch stats) after training on `batches`,
  from `variables` if given (no compiled init), else from the model's init."""
  trainer = train.Trainer(config, num_devices=num_devices, model_fn=model_fn)
  if variables is None:
    state = trainer.init_state(jax.random.key(0))
  else:
    state = trainer.state_from_variables(variables)
  init = jax.device_get(state.params)
  losses = []
  for b in batches:
    state, m = trainer.train(state, b)
    losses.append(float(m["loss"]))
  host = jax.device_get(state)
  delta = jax.tree_util.tree_map(lambda a, b: a - b, host.params, init)
  return losses, delta, host.batch_stats


def rel_error(a, b) -> float:
  """||a - b|| / ||b|| over all leaves of two pytrees."""
  a = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(a)])
  b = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(b)])
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def write_dicom(path, stored: np.ndarray, photometric: str, *,
                window=None, slope=1.0, intercept=0.0):
  """A minimal single-frame DICOM (explicit VR little endian, 12-bit)."""
  from pydicom.dataset import Dataset, FileMetaDataset
  from pydicom.uid import (ExplicitVRLittleEndian, SecondaryCaptureImageStorage,
                           generate_uid)
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
  meta.MediaStorageSOPInstanceUID = generate_uid()
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds = Dataset()
  ds.file_meta = meta
  ds.SOPClassUID = meta.MediaStorageSOPClassUID
  ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
  ds.Modality = "DX"
  ds.Rows, ds.Columns = stored.shape
  ds.SamplesPerPixel = 1
  ds.PhotometricInterpretation = photometric
  ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
  ds.PixelRepresentation = 0
  ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
  if window is not None:
    ds.WindowCenter, ds.WindowWidth = window
  ds.PixelData = stored.astype(np.uint16).tobytes()
  ds.save_as(path, enforce_file_format=True)
