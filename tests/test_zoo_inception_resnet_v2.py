"""Inception-ResNet-V2: Keras parity (both layouts, 224 and 299 px), the
converter's errors, parameter count, heads, dtype and CAM geometry."""

from __future__ import annotations

import contextlib
import shutil

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxr_jax import models, weights
from cxr_jax.models import inception_resnet_v2 as irv2
from cxr_jax.models.common import count_parameters, lse_pool
from cxr_jax.weights import inception_resnet_v2 as convert
from cxr_jax.weights.common import (ConversionError, flatten,
                                    per_block_shapes)

NAME = "inception_resnet_v2"
TOLERANCE = 1e-4  # max abs error on logits, float32
# keras.applications.InceptionResNetV2(weights=None).count_params(), 1000
# classes: parameters and BatchNorm moving statistics.
KERAS_COUNT = 55_873_736


@contextlib.contextmanager
def fast_keras_init(seed: int):
  """Keras draws each initial kernel with jax.random, which compiles one XLA
  program per kernel shape and dominates building InceptionResNetV2 on CPU.
  Any random weights prove a converter, so while building, the same uniform
  distributions come from numpy (a no-op if Keras moves that function)."""
  try:
    import keras.src.backend.jax.random as keras_random
  except ImportError:
    keras_random = None
  rng = np.random.default_rng(seed)

  def uniform(shape, minval=0.0, maxval=1.0, dtype=None, seed=None):
    return jnp.asarray(rng.uniform(minval, maxval, shape), dtype or "float32")
  with pytest.MonkeyPatch.context() as mp:
    if hasattr(keras_random, "uniform"):
      mp.setattr(keras_random, "uniform", uniform)
    yield


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  pytest.importorskip("keras")
  from cxr_jax.parity import inception_resnet_v2 as parity
  from cxr_jax.parity import keras as pk
  ref = parity.REFERENCES[NAME]
  with fast_keras_init(3):
    net = pk.build_keras_reference(ref, 299, seed=3)
  paths = pk.save_keras_weights(net, str(tmp_path_factory.mktemp("irv2")))
  converted = {layout: convert.convert_keras(path)
               for layout, path in paths.items()}
  return ref, net, paths, converted


@pytest.fixture(scope="module")
def forward():
  model = irv2.InceptionResNetV2()
  return jax.jit(lambda v, x: model.apply(v, x, return_features=True))


@pytest.mark.parametrize("size", [224, 299])
@pytest.mark.slow
def test_keras_parity(reference, forward, size):
  from cxr_jax.parity import keras as pk
  from cxr_jax.parity.common import max_abs_error
  ref, net, _, converted = reference
  if size != 299:
    with fast_keras_init(size):  # its initial weights are replaced anyway
      net = pk.keras_at_size(ref, net, size)
  x = np.random.default_rng(size).uniform(-1, 1, (1, size, size, 3)
                                          ).astype(np.float32)
  k_logits, k_map = pk.keras_outputs(ref, net, x)
  # Random weights must leave a signal, or the comparison proves nothing.
  assert k_logits.std() > 1e-2 and k_map.std() > 1e-2
  for layout, (variables, meta) in converted.items():
    assert meta["layout"] == layout and meta["num_classes"] == 1000
    logits, out = forward(variables, x)
    err_logits = max_abs_error(logits, k_logits)
    err_map = max_abs_error(out["conv_7b"], k_map)
    print(f"{layout}@{size}: logits {err_logits:.2e}, conv_7b {err_map:.2e}")
    assert err_logits <= TOLERANCE and err_map <= TOLERANCE
  # The 'avg' head is linear: the class maps average to the logits.
  np.testing.assert_allclose(out["class_maps"].mean((1, 2)), logits,
                             atol=1e-5)
  cells, offset, stride = irv2.feature_grid(size)
  assert out["conv_7b"].shape == (1, cells, cells, 1536)
  assert out["pooled"].shape == (1, 1536)


def test_feature_grid_by_hand():
  # Seven layers move the grid, each a 3x3 VALID: the centre of cell 0
  # shifts by one input step of each, 1+2+2+4+4+8+16 = 37, from 0.5.
  assert irv2.feature_grid(299) == (8, 37.5, 32.0)
  # 299 is symmetric: the last centre is 37.5 px from the far edge too.
  assert 299 - (37.5 + 32 * 7) == 37.5
  assert irv2.feature_grid(224) == (5, 37.5, 32.0)
  assert irv2.InceptionResNetV2().feature_grid(75)[0] == 1


def test_parameter_count(reference):
  model = irv2.InceptionResNetV2(num_classes=1000)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                             jnp.zeros((1, 75, 75, 3))))
  assert count_parameters(shapes) == KERAS_COUNT
  assert reference[1].count_params() == KERAS_COUNT
  # Biases only on the 40 residual up convolutions, block by block once
  # the scanned groups are split into Keras' blocks.
  blocks = per_block_shapes({k: v.shape for k, v in flatten(
      shapes["params"]).items()}, irv2.REPEATED)
  biased = [k for k in blocks if k.endswith("conv/bias")]
  assert len(biased) == 40 and all(k.split("/")[0].startswith("block")
                                   for k in biased)
  assert {k.split("/")[0] for k in biased} == {
      f"{t}_{i}" for t, n, _ in irv2.REPEATS for i in range(1, n + 1)}


def test_registry_row_and_conversion_meta(reference, tmp_path):
  model = models.build(NAME, num_classes=15)
  assert isinstance(model, irv2.InceptionResNetV2)
  out = str(tmp_path / "w.npz")
  meta = weights.convert(NAME, "keras", reference[2]["keras3"], out)
  assert meta["model"] == NAME and meta["source"] == "keras"
  assert weights.architecture(out) == (NAME, {"input_norm": "inception"})
  a = flatten(weights.load_pretrained(out))
  b = flatten(reference[3]["legacy"][0])
  assert a.keys() == b.keys()
  for k in a:  # both layouts carry the same numbers
    np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.slow
def test_lse_head_and_bfloat16_at_the_smallest_size(reference):
  variables = reference[3]["legacy"][0]
  model = irv2.InceptionResNetV2(dtype=jnp.bfloat16, head_pooling="lse")
  x = np.random.default_rng(0).uniform(-1, 1, (2, 75, 75, 3)
                                       ).astype(np.float32)
  logits, out = jax.jit(lambda v, x: model.apply(
      v, x, return_features=True))(variables, x)
  assert logits.dtype == jnp.float32 and logits.shape == (2, 1000)
  assert out["conv_7b"].dtype == jnp.bfloat16
  assert out["class_maps"].shape == (2, 1, 1, 1000)
  np.testing.assert_allclose(lse_pool(out["class_maps"], model.lse_r),
                             logits, rtol=1e-6, atol=1e-6)
  assert np.all(np.isfinite(logits))
  params = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 75, 75, 3))))["params"]
  assert {v.dtype for v in jax.tree_util.tree_leaves(params)} == {
      jnp.dtype(jnp.float32)}


def test_bad_inputs_are_refused():
  model = irv2.InceptionResNetV2()
  with pytest.raises(ValueError, match="at least 75x75"):
    model.apply({}, jnp.zeros((1, 74, 74, 3)))
  with pytest.raises(ValueError, match="3 channels"):
    model.apply({}, jnp.zeros((1, 299, 299, 1)))


def _str(name) -> str:
  return name.decode() if isinstance(name, bytes) else str(name)


def _edit_legacy(src: str, dst: str, layer: str, arrays=None) -> None:
  """A copy of a legacy .h5 without `layer` (arrays None) or with `layer`'s
  arrays replaced."""
  shutil.copyfile(src, dst)
  with h5py.File(dst, "r+") as f:
    names = [_str(n) for n in f.attrs["layer_names"]]
    assert layer in names
    wnames = [_str(w) for w in f[layer].attrs["weight_names"]]
    if arrays is None:
      del f[layer]
      f.attrs["layer_names"] = [n.encode() for n in names if n != layer]
      return
    for w, a in zip(wnames, arrays):
      del f[layer][w]
      f[layer].create_dataset(w, data=a)


def test_converter_names_missing_mismatched_and_wrong_files(reference,
                                                           tmp_path):
  legacy = reference[2]["legacy"]
  missing = str(tmp_path / "missing.h5")
  _edit_legacy(legacy, missing, "block17_4_conv")
  with pytest.raises(ConversionError, match=r"missing\.h5(.|\n)*"
                     r"block17_4/conv/kernel: the model has it"):
    convert.convert_keras(missing)
  wrong = str(tmp_path / "shape.h5")
  up = reference[3]["legacy"][0]["params"]["block8"]["conv"]
  kernel, bias = up["kernel"][1], up["bias"][1]  # block8_2, the file's order
  _edit_legacy(legacy, wrong, "block8_2_conv",
               [kernel[..., :-1], bias[:-1]])
  with pytest.raises(ConversionError, match=r"shape\.h5(.|\n)*"
                     r"block8_2/conv/kernel: model shape"):
    convert.convert_keras(wrong)
  fewer = str(tmp_path / "fewer.h5")
  # Keras numbers anonymous layers across the session (conv2d_7 or
  # conv2d_665, by what the tests built before): drop one by rank.
  with h5py.File(legacy, "r") as f:
    anonymous = [n for n in map(_str, f.attrs["layer_names"])
                 if n == "conv2d" or n.startswith("conv2d_")]
  _edit_legacy(legacy, fewer, anonymous[7])
  with pytest.raises(ConversionError, match=r"fewer\.h5.*202 anonymous"):
    convert.convert_keras(fewer)
  text = tmp_path / "notes.h5"
  text.write_text("not HDF5")
  with pytest.raises(ConversionError, match="notes.h5"):
    convert.convert_keras(str(text))


def test_keras2_style_names_convert_identically(reference, tmp_path):
  """The ImageNet file was written by Keras 2: 1-based auto-names, offset by
  whatever that session had built before. Ranks are sorted, not read."""
  renamed = str(tmp_path / "keras2.h5")
  shutil.copyfile(reference[2]["legacy"], renamed)
  with h5py.File(renamed, "r+") as f:
    names = [_str(n) for n in f.attrs["layer_names"]]
    new = {}
    for n in names:
      base, _, num = n.rpartition("_")
      if n in ("conv2d", "batch_normalization"):
        new[n] = f"{n}_6"
      elif num.isdigit() and base in ("conv2d", "batch_normalization"):
        new[n] = f"{base}_{int(num) + 6}"
      else:
        new[n] = n
    for n in names:  # via temporary names: conv2d_7 may still exist
      f.move(n, f"tmp_{n}")
    for n in names:
      f.move(f"tmp_{n}", new[n])
    f.attrs["layer_names"] = [new[n].encode() for n in names]
  a = flatten(convert.convert_keras(renamed)[0])
  b = flatten(reference[3]["legacy"][0])
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


def test_notop_file_converts_without_head(reference, tmp_path):
  notop = str(tmp_path / "notop.h5")
  _edit_legacy(reference[2]["legacy"], notop, "predictions")
  variables, meta = convert.convert_keras(notop)
  assert meta["num_classes"] is None and "head" not in variables["params"]


@pytest.mark.slow
def test_parity_check_entry_point():
  """The check `cxr-jax parity-check` runs: registry dispatch, both layouts,
  at the smallest size, batch 1
  (test_keras_parity proves 224 and 299)."""
  pytest.importorskip("keras")
  from cxr_jax.parity import inception_resnet_v2 as parity
  errors = parity.CHECKS[NAME](sizes=(75,), batch=1, seed=0)
  print(errors)
  assert len(errors) == 4 and max(errors.values()) <= TOLERANCE
