"""DenseNet-121/169/201: parity with keras.applications (both layouts) and
torchvision (224 and 299 px), CheXNet's legacy keys, the converters' errors,
parameter counts, heads, dtype and CAM geometry."""

from __future__ import annotations

import logging

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_variables
from cxr_jax import models, weights
from cxr_jax.models import densenet
from cxr_jax.models.common import count_parameters, lse_pool
from cxr_jax.parity.common import max_abs_error
from cxr_jax.weights import densenet as convert
from cxr_jax.weights.common import ConversionError, flatten

TOLERANCE = 1e-4  # max abs error on logits (and the map), float32
SIZES = (224, 299)
# keras.applications.DenseNet<d>(weights=None).count_params(): parameters and
# BatchNorm moving statistics, 1000 classes.
KERAS_COUNTS = {121: 8_062_504, 169: 14_307_880, 201: 20_242_984}
# torchvision's published num_params (parameters only).
TORCHVISION_COUNTS = {121: 7_978_856, 169: 14_149_480, 201: 20_013_928}


def jitted_keras_outputs(ref, net, x):
  """The Keras side; asserts that the random reference leaves a signal, or
  the comparison would prove nothing."""
  from cxr_jax.parity import keras as pk
  logits, fmap = pk.keras_outputs(ref, net, x)
  assert logits.std() > 1e-2 and fmap.std() > 1e-2
  return logits, fmap


# densenet121 in the fast tier; the deeper two are slow.
DEPTHS = [121, pytest.param(169, marks=pytest.mark.slow),
          pytest.param(201, marks=pytest.mark.slow)]
# 'SAME'-style padding at stride 2 differs between even and odd sizes only
# in the stem and the transitions, which every depth shares: DenseNet-121 is
# proven at both sizes, the deeper two at the odd one.
PARITY_CASES = [(121, 224), (121, 299),
                pytest.param(169, 299, marks=pytest.mark.slow),
                pytest.param(201, 299, marks=pytest.mark.slow)]


def sizes_for(depth: int) -> tuple[int, ...]:
  return SIZES if depth == 121 else (299,)


@pytest.fixture(scope="module")
def keras_references(tmp_path_factory):
  """depth -> a random Keras DenseNet, its two weight files and their
  conversions; each built once, when a test first asks for it."""
  pytest.importorskip("keras")
  from cxr_jax.parity import densenet as parity
  from cxr_jax.parity import keras as pk
  cache = {}

  def get(depth: int):
    if depth not in cache:
      name = f"densenet{depth}"
      ref = parity.KERAS_REFERENCES[name]
      net = pk.build_keras_reference(ref, 224, seed=3)
      paths = pk.save_keras_weights(net, str(tmp_path_factory.mktemp(name)))
      converted = {layout: convert.convert_keras(path, name)
                   for layout, path in paths.items()}
      cache[depth] = ref, net, paths, converted
    return cache[depth]
  return get


@pytest.fixture(scope="module")
def keras121(keras_references):
  return keras_references(121)


@pytest.fixture(scope="module")
def torch121(tmp_path_factory):
  """A random torchvision densenet121 and its state dict on disk."""
  torch = pytest.importorskip("torch")
  from cxr_jax.parity import torch_densenet
  torch.manual_seed(0)
  net = torch_densenet.reference(121).eval()
  torch_densenet.randomize(net, 0)
  path = str(tmp_path_factory.mktemp("tv121") / "densenet121.pth")
  torch.save(net.state_dict(), path)
  return net, path


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.slow
def test_both_keras_layouts_convert_to_the_same_arrays(keras_references,
                                                       depth):
  _, _, _, converted = keras_references(depth)
  (a, meta_a), (b, meta_b) = converted["legacy"], converted["keras3"]
  assert (meta_a["layout"], meta_b["layout"]) == ("legacy", "keras3")
  for meta in (meta_a, meta_b):
    assert meta["model"] == f"densenet{depth}" and meta["num_classes"] == 1000
    assert meta["model_kwargs"] == {"variant": "keras", "input_norm": "torch"}
  a, b = flatten(a), flatten(b)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize("depth,size", PARITY_CASES)
@pytest.mark.slow
def test_keras_parity(keras_references, depth, size):
  """The legacy conversion against Keras; the Keras 3 one is the same arrays
  (test above). Also the 'avg' head's class maps and the CAM grid."""
  from cxr_jax.parity import keras as pk
  ref, net, _, converted = keras_references(depth)
  if size != 224:
    net = pk.keras_at_size(ref, net, size)
  x = np.random.default_rng(size).uniform(-1, 1, (1, size, size, 3)
                                          ).astype(np.float32)
  k_logits, k_map = jitted_keras_outputs(ref, net, x)
  variables, meta = converted["legacy"]
  model = densenet.DenseNet(depth=depth, **meta["model_kwargs"])
  logits, out = jax.jit(lambda v, x: model.apply(v, x, return_features=True))(
      variables, x)
  err_logits = max_abs_error(logits, k_logits)
  err_map = max_abs_error(out["features"], k_map)
  print(f"densenet{depth} keras@{size}: logits {err_logits:.2e}, "
        f"features {err_map:.2e}")
  assert err_logits <= TOLERANCE and err_map <= TOLERANCE
  np.testing.assert_allclose(out["class_maps"].mean((1, 2)), logits,
                             atol=1e-5)
  cells, _, _ = model.feature_grid(size)
  channels = {121: 1024, 169: 1664, 201: 1920}[depth]
  assert out["features"].shape == (1, cells, cells, channels)
  np.testing.assert_array_equal(out["feature_map"], out["features"])


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.slow
def test_torchvision_parity(depth):
  pytest.importorskip("torch")
  from cxr_jax.parity import torch_densenet
  sizes = sizes_for(depth)
  errors = torch_densenet.CHECKS[f"densenet{depth}"](sizes=sizes, batch=1)
  print(f"densenet{depth}", errors)
  assert sorted(errors) == sorted(f"torchvision@{s}/{o}" for s in sizes
                                  for o in ("logits", "feature_map"))
  assert max(errors.values()) <= TOLERANCE


def test_parity_check_runs_both_sources(monkeypatch):
  """`cxr-jax parity-check`'s entry: the Keras row and the torch reference,
  one error dict. (Each proof runs for real in the tests above; here only
  the wiring, which would otherwise cost two more minutes per model.)"""
  from cxr_jax.parity import densenet as parity
  from cxr_jax.parity import keras as pk
  from cxr_jax.parity import torch_densenet
  ref = parity.KERAS_REFERENCES["densenet169"]
  assert (ref.application, ref.feature_layer, ref.preprocess_module) == (
      "DenseNet169", "relu", "densenet")
  calls = []
  monkeypatch.setattr(pk, "keras_parity", lambda *a: calls.append(
      ("keras", *a)) or {"legacy@64/logits": 1.0})
  monkeypatch.setattr(torch_densenet, "torch_parity", lambda *a: calls.append(
      ("torch", *a)) or {"torchvision@64/logits": 2.0})
  errors = parity.CHECKS["densenet169"](sizes=(64,), batch=3, seed=5)
  assert errors == {"legacy@64/logits": 1.0, "torchvision@64/logits": 2.0}
  assert calls == [("keras", "densenet169", ref, (64,), 3, 5),
                   ("torch", "densenet169", (64,), 3, 5)]


def test_chexnet_legacy_keys_convert_to_the_same_arrays(torch121, tmp_path,
                                                       caplog):
  """arnoweng/CheXNet's checkpoint keys (`module.densenet121.` prefix,
  `norm.1`/`conv.2`, `classifier.0.`) give exactly torchvision's arrays."""
  import torch
  from cxr_jax.parity import torch_densenet
  net, path = torch121
  checkpoint = torch_densenet.chexnet_checkpoint(net.state_dict())
  keys = list(checkpoint["state_dict"])
  assert ("module.densenet121.features.denseblock1.denselayer1.norm.1.weight"
          in keys and "module.densenet121.classifier.0.bias" in keys)
  assert not any(".norm1." in k or ".conv2." in k for k in keys)
  legacy = str(tmp_path / "model.pth.tar")
  torch.save(checkpoint, legacy)
  a, meta_a = convert.convert_torchvision(path, "densenet121")
  with caplog.at_level(logging.INFO, logger="cxr_jax.weights"):
    b, meta_b = convert.convert_torchvision(legacy, "densenet121")
  # Every key carries CheXNet's prefix, so every one is renamed.
  assert meta_a["renamed_keys"] == 0 and meta_b["renamed_keys"] == len(keys)
  assert "renamed" in caplog.text
  for meta in (meta_a, meta_b):
    assert meta["model_kwargs"] == {"variant": "torchvision",
                                    "input_norm": "torch"}
  a, b = flatten(a), flatten(b)
  assert a.keys() == b.keys() and "params/head/kernel" in a
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


def test_torchvision_key_renaming():
  key = convert.torchvision_key
  assert key("features.denseblock2.denselayer7.norm.2.running_var") == (
      "features.denseblock2.denselayer7.norm2.running_var")
  assert key("module.densenet121.features.denseblock1.denselayer1.conv.1."
             "weight") == "features.denseblock1.denselayer1.conv1.weight"
  assert key("module.densenet121.classifier.0.weight") == "classifier.weight"
  # Transitions and the stem kept their names; they must not be touched.
  assert key("features.transition1.norm.weight") == (
      "features.transition1.norm.weight")
  assert key("features.norm0.bias") == "features.norm0.bias"


def _edited_torch(path: str, out: str, edit) -> str:
  import torch
  sd = torch.load(path, weights_only=True)
  edit(sd)
  torch.save(sd, out)
  return out


def test_torchvision_converter_errors(torch121, tmp_path):
  import torch
  from cxr_jax.parity import torch_densenet
  _, path = torch121
  missing = _edited_torch(
      path, str(tmp_path / "missing.pth"),
      lambda sd: sd.pop("features.denseblock3.denselayer5.conv2.weight"))
  with pytest.raises(ConversionError, match=r"missing\.pth.*"
                     r"features\.denseblock3\.denselayer5\.conv2\.weight"):
    convert.convert_torchvision(missing, "densenet121")
  shape = _edited_torch(
      path, str(tmp_path / "shape.pth"),
      lambda sd: sd.update({"features.norm5.weight": torch.ones(7)}))
  with pytest.raises(ConversionError, match=r"shape\.pth(.|\n)*"
                     r"features/norm5/scale: model shape \(1024,\)"):
    convert.convert_torchvision(shape, "densenet121")
  deeper = str(tmp_path / "densenet169.pth")
  torch.save(torch_densenet.reference(169).state_dict(), deeper)
  with pytest.raises(ConversionError, match=r"densenet169\.pth.*denseblock3"
                     r"\.denselayer25.*not part of densenet121"):
    convert.convert_torchvision(deeper, "densenet121")
  other = str(tmp_path / "resnet.pth")
  torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, other)
  with pytest.raises(ConversionError, match=r"resnet\.pth is not a "
                     r"torchvision DenseNet state dict"):
    convert.convert_torchvision(other, "densenet121")
  text = tmp_path / "notes.pth"
  text.write_text("not a checkpoint")
  with pytest.raises(ConversionError, match="notes.pth"):
    convert.convert_torchvision(str(text), "densenet121")
  with pytest.raises(ConversionError, match="not 'resnet50'"):
    convert.convert_torchvision(path, "resnet50")


def _copy_legacy(src: str, dst: str, rename=lambda n: n, edit=None) -> None:
  """Copies a legacy .h5 with layer names `rename`d (Keras 2 style: nested
  groups for '/', weight names ending ':0'); `edit(name, arrays)` may drop
  a layer (None) or replace its arrays."""
  with h5py.File(src) as f, h5py.File(dst, "w") as g:
    kept = []
    for n in f.attrs["layer_names"]:
      n = n.decode() if isinstance(n, bytes) else n
      wnames = [w.decode() if isinstance(w, bytes) else w
                for w in f[n].attrs["weight_names"]]
      arrays = [f[n][w][()] for w in wnames]
      if edit is not None:
        arrays = edit(n, arrays)
        if arrays is None:
          continue
      new = rename(n)
      kept.append(new)
      grp = g.create_group(new)
      names = [f"{new}/{w.split('/')[-1]}:0" for w in wnames]
      for w, a in zip(names, arrays):
        grp.create_dataset(w, data=a)
      grp.attrs["weight_names"] = [w.encode() for w in names]
    g.attrs["layer_names"] = [n.encode() for n in kept]


def test_keras2_names_convert_identically(keras121, tmp_path):
  """Keras 2's ImageNet files name the stem `conv1/conv`, `conv1/bn` and the
  head `fc1000`, with ':0' weight names."""
  _, _, paths, converted = keras121
  keras2 = str(tmp_path / "keras2.h5")
  names = {"conv1_conv": "conv1/conv", "conv1_bn": "conv1/bn",
           "predictions": "fc1000"}
  _copy_legacy(paths["legacy"], keras2, lambda n: names.get(n, n))
  with h5py.File(keras2) as f:
    assert "conv1/conv" in [n.decode() if isinstance(n, bytes) else n
                            for n in f.attrs["layer_names"]]
    assert "conv1/bn/gamma:0" in f["conv1/bn"]
  a = flatten(converted["legacy"][0])
  b = flatten(convert.convert_keras(keras2, "densenet121")[0])
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


def test_keras_converter_errors(keras121, tmp_path):
  _, _, paths, _ = keras121
  with pytest.raises(ConversionError, match=r"_legacy\.h5.*no layer "
                     r"'conv4_block25_0_bn'"):
    convert.convert_keras(paths["legacy"], "densenet169")
  with pytest.raises(ConversionError, match=r"\.weights\.h5.*120 conv "
                     r"layers; densenet169 has 168"):
    convert.convert_keras(paths["keras3"], "densenet169")
  missing = str(tmp_path / "missing.h5")
  _copy_legacy(paths["legacy"], missing,
               edit=lambda n, a: None if n == "conv3_block4_1_bn" else a)
  with pytest.raises(ConversionError, match=r"missing\.h5.*"
                     r"'conv3_block4_1_bn' \(our features/denseblock2/"
                     r"denselayer4/norm2\)"):
    convert.convert_keras(missing, "densenet121")
  shape = str(tmp_path / "shape.h5")
  _copy_legacy(paths["legacy"], shape, edit=lambda n, a: [a[0][..., :-1]]
               if n == "conv5_block16_2_conv" else a)
  with pytest.raises(ConversionError, match=r"shape\.h5(.|\n)*"
                     r"features/denseblock4/denselayer16/conv2/kernel: "
                     r"model shape \(3, 3, 128, 32\) != "
                     r"file shape \(3, 3, 128, 31\)"):
    convert.convert_keras(shape, "densenet121")
  text = tmp_path / "notes.h5"
  text.write_text("not HDF5")
  with pytest.raises(ConversionError, match="notes.h5"):
    convert.convert_keras(str(text), "densenet121")


def test_notop_keras_file_converts_without_head(keras121, tmp_path):
  _, _, paths, _ = keras121
  notop = str(tmp_path / "notop.h5")
  _copy_legacy(paths["legacy"], notop,
               edit=lambda n, a: None if n == "predictions" else a)
  variables, meta = convert.convert_keras(notop, "densenet121")
  assert meta["num_classes"] is None and "head" not in variables["params"]


def test_registry_rows_and_conversion_meta(keras121, tmp_path):
  model = models.build("densenet169", num_classes=15, variant="torchvision")
  assert isinstance(model, densenet.DenseNet) and model.depth == 169
  out = str(tmp_path / "w.npz")
  meta = weights.convert("densenet121", "keras", keras121[2]["keras3"], out)
  assert meta["source"] == "keras" and meta["layout"] == "keras3"
  assert weights.architecture(out) == ("densenet121", {
      "variant": "keras", "input_norm": "torch"})


@pytest.mark.parametrize("depth", [121, 169, 201])
def test_parameter_counts(depth):
  model = densenet.DenseNet(num_classes=1000, depth=depth)
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
  assert count_parameters(shapes) == KERAS_COUNTS[depth]
  assert count_parameters(shapes["params"]) == TORCHVISION_COUNTS[depth]
  pytest.importorskip("torch")
  from cxr_jax.parity import torch_densenet
  net = torch_densenet.reference(depth)
  assert sum(p.numel() for p in net.parameters()) == TORCHVISION_COUNTS[depth]
  # Every torchvision tensor has a home in our tree: the converter proves
  # the names; here the counts of BN statistics agree too.
  stats = sum(b.numel() for n, b in net.named_buffers()
              if not n.endswith("num_batches_tracked"))
  assert count_parameters(shapes["batch_stats"]) == stats


def test_feature_grid_by_hand():
  # conv0 (7/2, pad 3) keeps cell 0's centre at 0.5 (3 - 3 = 0), pool0
  # (3/2, pad 1) too; each 2x2/2 transition pool moves it half a step:
  # 0.5 + 4/2 + 8/2 + 16/2 = 14.5 at stride 32.
  assert densenet.feature_grid(224) == (7, 14.5, 32.0)
  assert densenet.feature_grid(299) == (9, 14.5, 32.0)
  assert densenet.feature_grid(densenet.MIN_INPUT_SIZE)[0] == 1
  model = densenet.DenseNet(depth=121)
  for size in (224, 299, densenet.MIN_INPUT_SIZE):
    _, out = jax.eval_shape(lambda: model.init_with_output(
        jax.random.key(0), jnp.zeros((1, size, size, 3)),
        return_features=True)[0])
    assert out["features"].shape[1:3] == (model.feature_grid(size)[0],) * 2


@pytest.mark.slow
def test_lse_head_in_bfloat16():
  model = densenet.DenseNet(num_classes=3, depth=121, dtype=jnp.bfloat16,
                            head_pooling="lse")
  variables = random_variables(model, 64)
  x = np.random.default_rng(1).uniform(-1, 1, (2, 64, 64, 3)
                                       ).astype(np.float32)
  logits, out = jax.jit(lambda v, x: model.apply(
      v, x, return_features=True))(variables, x)
  assert logits.dtype == jnp.float32 and logits.shape == (2, 3)
  assert out["features"].dtype == jnp.bfloat16
  assert out["class_maps"].shape == (2, 2, 2, 3)
  np.testing.assert_allclose(lse_pool(out["class_maps"], model.lse_r),
                             logits, rtol=1e-6, atol=1e-6)
  assert np.all(np.isfinite(logits)) and np.std(logits) > 0
  params = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 64, 64, 3))))["params"]
  assert {v.dtype for v in jax.tree_util.tree_leaves(params)} == {
      jnp.dtype(jnp.float32)}


def test_bad_options_and_inputs_are_refused():
  with pytest.raises(ValueError, match="variant must be one of"):
    densenet.DenseNet(variant="caffe").apply({}, jnp.zeros((1, 64, 64, 3)))
  with pytest.raises(ValueError, match="depth must be one of"):
    densenet.DenseNet(depth=161).apply({}, jnp.zeros((1, 64, 64, 3)))
  model = densenet.DenseNet()
  with pytest.raises(ValueError, match="at least 29x29"):
    model.apply({}, jnp.zeros((1, 28, 28, 3)))
  with pytest.raises(ValueError, match="3 channels"):
    model.apply({}, jnp.zeros((1, 224, 224, 1)))
