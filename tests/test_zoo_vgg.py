"""VGG16/19: parity with keras.applications (both layouts) and torchvision
(224 and 299 px), fc6/fc7 skipped by name, the converters' errors, parameter
counts, heads, dtype and CAM geometry."""

from __future__ import annotations

import logging

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxr_jax import models, weights
from cxr_jax.models import vgg
from cxr_jax.models.common import count_parameters, lse_pool
from cxr_jax.weights import vgg as convert
from cxr_jax.weights.common import ConversionError

TOLERANCE = 1e-4  # max abs error on logits (and the map), float32
SIZES = (224, 299)
# keras.applications.VGG<d>(weights=None, include_top=False).count_params().
KERAS_NOTOP_COUNTS = {16: 14_714_688, 19: 20_024_384}
# torchvision's published num_params: the convolutions plus fc6/fc7/fc8.
TORCHVISION_COUNTS = {16: 138_357_544, 19: 143_667_240}


def _check(name: str, sizes=SIZES):
  pytest.importorskip("keras")
  pytest.importorskip("torch")
  from cxr_jax.parity import vgg as parity
  errors = parity.CHECKS[name](sizes=sizes, batch=1)
  print(name, errors)
  assert sorted(errors) == sorted(
      f"{source}@{size}/{out}" for source in ("legacy", "keras3",
                                              "torchvision")
      for size in sizes for out in ("logits", "feature_map"))
  assert max(errors.values()) <= TOLERANCE


@pytest.mark.slow
def test_parity_vgg16():
  """The check `cxr-jax parity-check` runs: registry dispatch, both Keras
  layouts and the torchvision reference, at 224 and 299."""
  _check("vgg16")


@pytest.mark.slow
def test_parity_vgg19():
  # VGG pads every convolution by one at stride 1 and pools 2x2 'VALID':
  # VGG16 at both sizes proves the odd size's floor; VGG19 adds layers only.
  _check("vgg19", sizes=(299,))


@pytest.fixture(scope="module")
def keras16(tmp_path_factory):
  """Keras VGG16 as published (include_top=True: fc1, fc2, predictions on a
  7x7 map) with random weights, saved in both layouts."""
  pytest.importorskip("keras")
  from cxr_jax.parity import keras as pk
  import keras
  keras.utils.set_random_seed(0)
  net = keras.applications.VGG16(weights=None, input_shape=(224, 224, 3))
  paths = pk.save_keras_weights(net, str(tmp_path_factory.mktemp("vgg16")))
  return net, paths


def test_keras_top_is_skipped_by_name(keras16, caplog):
  net, paths = keras16
  for layout, path in paths.items():
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cxr_jax.weights"):
      variables, meta = convert.convert_keras(path, "vgg16")
    skipped = (["fc1", "fc2", "predictions"] if layout == "legacy"
               else ["dense", "dense_1", "dense_2"])
    assert meta["skipped"] == skipped and meta["num_classes"] is None
    assert meta["model_kwargs"] == {"input_norm": "caffe"}
    for name in skipped:
      assert f"skipped {name} " in caplog.text
    assert "head" not in variables["params"]
    kernel = variables["params"]["block5_conv3"]["kernel"]
    np.testing.assert_array_equal(
        kernel, net.get_layer("block5_conv3").kernel.numpy())
    assert count_parameters(variables) == KERAS_NOTOP_COUNTS[16]


def _copy_legacy(src: str, dst: str, edit) -> None:
  """Copies a legacy .h5; `edit(name, arrays)` drops a layer (None) or
  replaces its arrays."""
  with h5py.File(src) as f, h5py.File(dst, "w") as g:
    kept = []
    for n in f.attrs["layer_names"]:
      n = n.decode() if isinstance(n, bytes) else n
      wnames = [w.decode() if isinstance(w, bytes) else w
                for w in f[n].attrs["weight_names"]]
      arrays = edit(n, [f[n][w][()] for w in wnames])
      if arrays is None:
        continue
      kept.append(n)
      grp = g.create_group(n)
      for w, a in zip(wnames, arrays):
        grp.create_dataset(w, data=a)
      grp.attrs["weight_names"] = [w.encode() for w in wnames]
    g.attrs["layer_names"] = [n.encode() for n in kept]


def test_keras_converter_errors(keras16, tmp_path):
  _, paths = keras16
  with pytest.raises(ConversionError, match=r"_legacy\.h5.*missing "
                     r"\['block3_conv4'"):
    convert.convert_keras(paths["legacy"], "vgg19")
  with pytest.raises(ConversionError, match=r"\.weights\.h5.*13 "
                     r"convolutions; vgg19 has 16"):
    convert.convert_keras(paths["keras3"], "vgg19")
  shape = str(tmp_path / "shape.h5")
  _copy_legacy(paths["legacy"], shape, lambda n, a: [a[0][..., :-1], a[1]]
               if n == "block4_conv2" else a)
  with pytest.raises(ConversionError, match=r"shape\.h5(.|\n)*"
                     r"block4_conv2/kernel: model shape \(3, 3, 512, 512\) "
                     r"!= file shape \(3, 3, 512, 511\)"):
    convert.convert_keras(shape, "vgg16")
  text = tmp_path / "notes.h5"
  text.write_text("not HDF5")
  with pytest.raises(ConversionError, match="notes.h5"):
    convert.convert_keras(str(text), "vgg16")
  with pytest.raises(ConversionError, match="not 'densenet121'"):
    convert.convert_keras(paths["legacy"], "densenet121")


@pytest.fixture(scope="module")
def torch16(tmp_path_factory):
  """torchvision's vgg16 with its fc6/fc7/fc8 (narrowed to 64 wide: the
  keys and fc6's 25088 inputs are what matter), random, on disk."""
  torch = pytest.importorskip("torch")
  from cxr_jax.parity import torch_vgg
  torch.manual_seed(0)
  net = torch_vgg.full_reference(16, hidden=64)
  path = str(tmp_path_factory.mktemp("tv16") / "vgg16.pth")
  torch.save(net.state_dict(), path)
  return net, path


@pytest.mark.parametrize("depth", [16, 19])
def test_torchvision_reference_has_the_published_count(depth):
  torch = pytest.importorskip("torch")
  from cxr_jax.parity import torch_vgg
  with torch.device("meta"):  # shapes only: no 0.5 GB of weights
    net = torch_vgg.full_reference(depth)
  assert sum(p.numel() for p in net.parameters()) == TORCHVISION_COUNTS[depth]
  convs = sum(p.numel() for n, p in net.named_parameters()
              if n.startswith("features."))
  assert convs == KERAS_NOTOP_COUNTS[depth]


def test_torchvision_classifier_is_skipped_by_name(torch16, caplog):
  net, path = torch16
  with caplog.at_level(logging.INFO, logger="cxr_jax.weights"):
    variables, meta = convert.convert_torchvision(path, "vgg16")
  assert meta["skipped"] == ["classifier.0", "classifier.3", "classifier.6"]
  for name in meta["skipped"]:
    assert f"skipped {name} " in caplog.text
  assert meta["num_classes"] is None
  assert meta["model_kwargs"] == {"input_norm": "torch"}
  np.testing.assert_array_equal(
      variables["params"]["block5_conv3"]["kernel"],
      net.features[28].weight.detach().numpy().transpose(2, 3, 1, 0))
  assert count_parameters(variables) == KERAS_NOTOP_COUNTS[16]


def test_torchvision_converter_errors(torch16, tmp_path):
  import torch
  from cxr_jax.parity import torch_vgg
  _, path = torch16
  sd = torch.load(path, weights_only=True)
  missing = str(tmp_path / "missing.pth")
  torch.save({k: v for k, v in sd.items() if k != "features.17.bias"},
             missing)
  with pytest.raises(ConversionError, match=r"missing\.pth.*"
                     r"'features\.17\.bias'"):
    convert.convert_torchvision(missing, "vgg16")
  shape = str(tmp_path / "shape.pth")
  torch.save({**sd, "features.26.bias": torch.zeros(3)}, shape)
  with pytest.raises(ConversionError, match=r"shape\.pth(.|\n)*"
                     r"block5_conv2/bias: model shape \(512,\)"):
    convert.convert_torchvision(shape, "vgg16")
  deeper = str(tmp_path / "vgg19.pth")
  torch.save(torch_vgg.reference(19).state_dict(), deeper)
  with pytest.raises(ConversionError, match=r"vgg19\.pth: convolutions at "
                     r"features\.\[0, 2, 5, 7, 10, 12, 14, 16, .*a vgg19 file"):
    convert.convert_torchvision(deeper, "vgg16")
  bn = str(tmp_path / "vgg16_bn.pth")
  torch.save({**sd, "features.1.running_mean": torch.zeros(64)}, bn)
  with pytest.raises(ConversionError, match=r"vgg16_bn\.pth is a VGG with "
                     r"BatchNorm"):
    convert.convert_torchvision(bn, "vgg16")
  other = str(tmp_path / "densenet.pth")
  torch.save({"features.conv0.weight": torch.zeros(64, 3, 7, 7)}, other)
  with pytest.raises(ConversionError, match=r"densenet\.pth is not a "
                     r"torchvision VGG state dict"):
    convert.convert_torchvision(other, "vgg16")
  two_heads = str(tmp_path / "two_heads.pth")
  torch.save({**{k: v for k, v in sd.items()
                 if not k.startswith("classifier.")},
              "classifier.0.weight": torch.zeros(4, 512),
              "classifier.0.bias": torch.zeros(4),
              "classifier.2.weight": torch.zeros(5, 512),
              "classifier.2.bias": torch.zeros(5)}, two_heads)
  with pytest.raises(ConversionError, match=r"two_heads\.pth.*"
                     r"classifier\.0 and classifier\.2"):
    convert.convert_torchvision(two_heads, "vgg16")


def test_torchvision_indices_are_torchvisions():
  assert list(convert.torchvision_indices(16)) == [
      0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
  assert list(convert.torchvision_indices(19)) == [
      0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34]


@pytest.mark.parametrize("depth", [16, 19])
def test_parameter_counts(depth):
  model = vgg.VGG(num_classes=1000, depth=depth)
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  assert "batch_stats" not in shapes
  assert count_parameters(shapes) == KERAS_NOTOP_COUNTS[depth] + 513_000


def test_feature_grid_by_hand():
  # Only the five 2x2/2 pools move cell centres, each by half its input
  # step: 0.5 + 0.5 + 1 + 2 + 4 + 8 = 16 at stride 32, the middle of the
  # 32-px block a cell covers.
  assert vgg.feature_grid(224) == (7, 16.0, 32.0)
  assert vgg.feature_grid(299) == (9, 16.0, 32.0)
  model = vgg.VGG(depth=16)
  for size in (224, 299, vgg.MIN_INPUT_SIZE):
    _, out = jax.eval_shape(lambda: model.init_with_output(
        jax.random.key(0), jnp.zeros((1, size, size, 3)),
        return_features=True)[0])
    assert out["features"].shape[1:3] == (model.feature_grid(size)[0],) * 2


@pytest.mark.slow
def test_heads_and_bfloat16():
  """'avg' class maps average to the logits; 'lse' pools the class maps;
  bfloat16 computes with float32 parameters and logits."""
  x = np.random.default_rng(1).uniform(-1, 1, (2, 64, 64, 3)
                                       ).astype(np.float32)
  avg = vgg.VGG(num_classes=3, depth=16)
  variables = jax.jit(avg.init)(jax.random.key(0), x[:1])
  # Random biases, so that a head that dropped one would show.
  variables = jax.tree_util.tree_map_with_path(
      lambda p, v: v + 0.1 if p[-1].key == "bias" else v, variables)
  logits, out = jax.jit(lambda v, x: avg.apply(v, x, return_features=True))(
      variables, x)
  assert out["features"].shape == (2, 2, 2, 512) and np.std(logits) > 0
  np.testing.assert_allclose(out["class_maps"].mean((1, 2)), logits,
                             atol=1e-5)
  lse = vgg.VGG(num_classes=3, depth=16, dtype=jnp.bfloat16,
                head_pooling="lse")
  logits, out = jax.jit(lambda v, x: lse.apply(v, x, return_features=True))(
      variables, x)
  assert logits.dtype == jnp.float32 and logits.shape == (2, 3)
  assert out["features"].dtype == jnp.bfloat16
  np.testing.assert_allclose(lse_pool(out["class_maps"], lse.lse_r), logits,
                             rtol=1e-6, atol=1e-6)
  assert {v.dtype for v in jax.tree_util.tree_leaves(variables)} == {
      jnp.dtype(jnp.float32)}


def test_registry_rows_and_conversion_meta(keras16, tmp_path):
  model = models.build("vgg19", num_classes=15, input_norm="torch")
  assert isinstance(model, vgg.VGG) and model.depth == 19
  out = str(tmp_path / "w.npz")
  weights.convert("vgg16", "keras", keras16[1]["keras3"], out)
  assert weights.architecture(out) == ("vgg16", {"input_norm": "caffe"})
  assert "head" not in weights.load_pretrained(out)["params"]


def test_bad_options_and_inputs_are_refused():
  with pytest.raises(ValueError, match="depth must be one of"):
    vgg.VGG(depth=11).apply({}, jnp.zeros((1, 64, 64, 3)))
  model = vgg.VGG()
  with pytest.raises(ValueError, match="at least 32x32"):
    model.apply({}, jnp.zeros((1, 31, 31, 3)))
  with pytest.raises(ValueError, match="3 channels"):
    model.apply({}, jnp.zeros((1, 224, 224, 4)))
