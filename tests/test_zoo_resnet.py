"""ResNet-50/101/152: both variants' architecture, both converters, and
parity with Keras' applications and torchvision's definition."""

from __future__ import annotations

import logging

import flax.linen as nn
import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_variables
from cxr_jax import models, weights
from cxr_jax.models import resnet
from cxr_jax.models.common import BatchNorm, count_parameters
from cxr_jax.parity import resnet as parity_resnet
from cxr_jax.weights import resnet as convert
from cxr_jax.weights.common import ConversionError, flatten, per_block_shapes

BAR = 1e-4  # max abs error on logits, float32
MAP_BAR = 1e-3  # the layer4 map is larger than the logits; same precision
SIZES = (224, 299)
# 'SAME' padding with stride 2 pads differently at even and odd sizes; where
# it does (the stem and each stage's first block) every depth of the family
# is the same network, so ResNet-50 is proven at both sizes and the deeper
# two at the odd one.
DEEP_SIZES = (299,)
SLOW = pytest.mark.slow

# Keras' count_params() (convolution biases and BatchNorm moving statistics
# included) for keras.applications.ResNet50/101/152 with the 1000-way top.
KERAS_COUNTS = {"resnet50": 25_636_712, "resnet101": 44_707_176,
                "resnet152": 60_419_944}
# torchvision 0.29.1's published num_params (parameters only).
TORCHVISION_COUNTS = {"resnet50": 25_557_032, "resnet101": 44_549_160,
                      "resnet152": 60_192_808}


def build(name, **kwargs):
  constructor, fixed = resnet.MODELS[name]
  return constructor(**{**fixed, **kwargs})


def shapes(model, size):
  return jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, size, size, 3))))


# --------------------------------------------------------------------------
# Architecture
# --------------------------------------------------------------------------

DEEP = [pytest.param("resnet101", marks=SLOW),
        pytest.param("resnet152", marks=SLOW)]


@pytest.mark.parametrize("name", ["resnet50", *DEEP])
def test_parameter_counts_match_both_upstreams(name):
  keras_vars = shapes(build(name, variant="keras"), 64)
  assert count_parameters(keras_vars) == KERAS_COUNTS[name]
  tv_vars = shapes(build(name, variant="torchvision"), 64)
  assert count_parameters(tv_vars["params"]) == TORCHVISION_COUNTS[name]


def _blocks(model, size=64) -> dict:
  """Parameter shapes by torchvision's block paths: the scanned groups
  split into their blocks."""
  return per_block_shapes(
      {k: v.shape for k, v in flatten(shapes(model, size)["params"]).items()},
      resnet.REPEATED[model.depth])


def test_module_names_are_torchvisions():
  flat = _blocks(build("resnet50"))
  for key in ("conv1/kernel", "bn1/scale", "layer1/0/conv1/kernel",
              "layer1/0/downsample/conv/kernel", "layer1/0/downsample/bn/bias",
              "layer4/2/bn3/scale", "head/kernel"):
    assert key in flat, key
  assert "layer1/1/downsample/conv/kernel" not in flat
  assert "conv1/bias" not in flat  # torchvision: no convolution biases
  assert "layer3/5/conv2/bias" in _blocks(build("resnet50", variant="keras"))
  # Blocks 1.. of a stage are one scanned group, stacked in order.
  stacked = flatten(shapes(build("resnet152"), 64)["params"])
  assert stacked["layer3/repeated/conv2/kernel"].shape == (35, 3, 3, 256, 256)


@pytest.mark.parametrize("variant", ["keras", "torchvision"])
def test_feature_grid_matches_layer4(variant):
  model = build("resnet50", variant=variant, num_classes=2)
  for size in SIZES:
    out = jax.eval_shape(
        lambda: model.init_with_output(
            jax.random.key(0), jnp.zeros((1, size, size, 3)),
            return_features=True)[0][1][resnet.FEATURE_MAP])
    cells, _, stride = model.feature_grid(size)
    assert out.shape[1:3] == (cells, cells) and stride == 32
  # By hand at 299: conv1 (7/2, pad 3) -> 150 cells centred at 0.5 + 2i
  # ((7-1)/2 - 3 = 0 px shift); pool (3/2, pad 1) -> 75 at 0.5 + 4i; each
  # stage halves with a centred kernel: 38, 19, 10 cells at 0.5 + 32i.
  assert model.feature_grid(299) == (10, 0.5, 32.0)
  assert model.feature_grid(224) == (7, 0.5, 32.0)


def test_avg_head_class_maps_average_to_the_logits_and_lse_works():
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 96, 96, 3)),
                  jnp.float32)
  model = build("resnet50", num_classes=4)
  variables = random_variables(model)
  logits, out = jax.jit(lambda v, x: model.apply(
      v, x, return_features=True))(variables, x)
  assert out["layer4"].shape == (2, 3, 3, 2048)
  np.testing.assert_allclose(out["class_maps"].mean((1, 2)), logits,
                             atol=1e-5, rtol=1e-5)
  lse = build("resnet50", num_classes=4, head_pooling="lse", lse_r=5.0)
  l_logits, l_out = jax.jit(lambda v, x: lse.apply(
      v, x, return_features=True))(variables, x)
  maps = np.asarray(l_out["class_maps"], np.float64)
  np.testing.assert_allclose(maps, out["class_maps"], atol=1e-5, rtol=1e-5)
  # log-mean-exp lies strictly between the mean and the max of each map
  assert (l_logits > maps.mean((1, 2)) + 1e-4).all()
  assert (l_logits < maps.max((1, 2))).all()


def test_bfloat16_computes_in_bf16_but_keeps_float32_parameters():
  model = build("resnet50", variant="keras", num_classes=3,
                dtype=jnp.bfloat16)
  leaves = jax.tree_util.tree_leaves(shapes(model, 64))
  assert leaves and all(leaf.dtype == jnp.float32 for leaf in leaves)
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (1, 64, 64, 3)),
                  jnp.float32)
  variables = random_variables(model)
  logits, out = jax.jit(lambda v, x: model.apply(
      v, x, return_features=True))(variables, x)
  assert out["layer4"].dtype == jnp.bfloat16
  assert logits.dtype == jnp.float32 and np.isfinite(logits).all()


def batch_norms(model, train):
  """Every BatchNorm `model` runs, as (path, momentum, epsilon, axis_name),
  read off a shape-only trace that skips them. (Each computes the two-pass
  variance: `common.BatchNorm` has no other.)"""
  seen = []

  def record(next_fun, args, kwargs, context):
    m = context.module
    if isinstance(m, BatchNorm) and context.method_name == "__call__":
      seen.append(("/".join(m.path), m.momentum, m.epsilon, m.axis_name))
      return args[0]  # a named axis has no meaning outside shard_map
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(lambda: model.init_with_output(
        jax.random.key(0), jnp.zeros((2, 64, 64, 3)), train=train))
  return seen


@pytest.mark.parametrize("variant,momentum,epsilon",
                         [("keras", 0.99, 1.001e-5),
                          ("torchvision", 0.9, 1e-5)])
def test_batch_norms_take_the_variants_momentum_and_epsilon(
    variant, momentum, epsilon):
  seen = batch_norms(build("resnet50", variant=variant), train=True)
  # One per convolution of the stem and each stage's first block, and one
  # per convolution of the body of each stage's scanned group (which Flax
  # may trace more than once); split into blocks, ResNet-50's 53.
  assert len({s[0] for s in seen}) == 1 + 4 * (4 + 3)
  assert sum(k.endswith("/scale") and "bn" in k.split("/")[-2] for k in
             _blocks(build("resnet50", variant=variant))) == 53
  assert {s[1:] for s in seen} == {(momentum, epsilon, None)}
  seen = batch_norms(build("resnet50", variant=variant, bn_momentum=0.5,
                           bn_axis_name="batch"), train=True)
  assert {s[1:] for s in seen} == {(0.5, epsilon, "batch")}
  # Inference normalises with the running statistics: no cross-device mean.
  seen = batch_norms(build("resnet50", variant=variant,
                           bn_axis_name="batch"), train=False)
  assert {s[3] for s in seen} == {None}


def test_bad_options_and_inputs_get_clear_errors():
  x = jnp.zeros((1, 64, 64, 3))
  with pytest.raises(ValueError, match="variant must be one of"):
    build("resnet50", variant="caffe").init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="depth must be one of"):
    resnet.ResNet(depth=34).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="at least 32x32"):
    build("resnet50").init(jax.random.key(0), jnp.zeros((1, 31, 64, 3)))
  with pytest.raises(ValueError, match="3 channels"):
    build("resnet50").init(jax.random.key(0), jnp.zeros((1, 64, 64, 1)))


# --------------------------------------------------------------------------
# Converters
# --------------------------------------------------------------------------

def size_free_keras(name, seed):
  """A random Keras ResNet (logits out) for any input size.

  keras.applications' ResNets with their 1000-way top need a fixed input
  size, and building one costs tens of seconds here. The include_top=False
  body takes any size, and the application's own top on it ('avg_pool',
  'predictions') gives the same layers in the same order, so one model
  serves 224 and 299. `parity.resnet.CHECKS` (slow tier) runs the
  fixed-size applications themselves.
  """
  keras = pytest.importorskip("keras")
  from cxr_jax.parity import keras as parity_keras
  keras.utils.set_random_seed(seed)
  app = parity_resnet.KERAS_REFERENCES[name].application
  body = getattr(keras.applications, app)(include_top=False, weights=None,
                                          input_shape=(None, None, 3))
  x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(body.output)
  x = keras.layers.Dense(1000, name="predictions")(x)
  net = keras.Model(body.input, x, name=name)
  parity_resnet.scale_residual_branches(net)
  parity_keras.randomize_batch_norm(net, seed=seed)
  return net


def check_keras_parity(name, net, paths, sizes=SIZES):
  """Both layouts convert to the same arrays, which compute the Keras
  model's logits and conv5_block3_out at `sizes`."""
  from cxr_jax.parity import keras as parity_keras
  assert net.count_params() == KERAS_COUNTS[name]
  converted = {layout: convert.convert_keras(path, name)
               for layout, path in paths.items()}
  (legacy, meta), (keras3, meta3) = converted["legacy"], converted["keras3"]
  assert meta["layout"] == "legacy" and meta3["layout"] == "keras3"
  for m in (meta, meta3):
    assert m["model"] == name and m["num_classes"] == 1000
    assert m["model_kwargs"] == {"variant": "keras", "input_norm": "caffe"}
  # conv2's shortcut (_0) and last (_3) convolutions have the same shape:
  # only equal arrays show that the Keras 3 layout's order is right.
  a, b = flatten(legacy), flatten(keras3)
  assert sorted(a) == sorted(b)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  ref = parity_resnet.KERAS_REFERENCES[name]
  rng = np.random.default_rng(0)
  for size in sizes:
    x = rng.uniform(-1, 1, (2, size, size, 3)).astype(np.float32)
    k_logits, k_map = parity_keras.keras_outputs(ref, net, x)
    model = build(name, **meta["model_kwargs"])
    f_logits, out = jax.jit(lambda v, x: model.apply(
        v, x, return_features=True))(legacy, x)
    f_map = np.asarray(out[resnet.FEATURE_MAP])
    assert f_map.shape == k_map.shape
    err = np.abs(f_logits - k_logits).max()
    map_err = np.abs(f_map - k_map).max()
    print(f"keras {name}@{size}: logits {err:.2e}, layer4 {map_err:.2e}")
    assert err <= BAR and map_err <= MAP_BAR


def check_torchvision_parity(name, sizes=SIZES):
  pytest.importorskip("torch")
  from cxr_jax.parity import torch_resnet
  errors = torch_resnet.CHECKS[name](sizes=sizes, batch=2, seed=0)
  assert sorted(errors) == sorted(f"torchvision@{s}/{o}" for s in sizes
                                  for o in ("logits", "feature_map"))
  print(name, errors)
  for key, err in errors.items():
    assert err <= (BAR if key.endswith("logits") else MAP_BAR), key


@pytest.fixture(scope="module")
def keras50(tmp_path_factory):
  """A random Keras ResNet50 and both of its weight layouts."""
  from cxr_jax.parity import keras as parity_keras
  net = size_free_keras("resnet50", seed=3)
  tmp = str(tmp_path_factory.mktemp("keras_resnet50"))
  return net, parity_keras.save_keras_weights(net, tmp, "resnet50")


@pytest.fixture(scope="module")
def torch50(tmp_path_factory):
  """A random torchvision resnet50's state dict, saved as a .pth."""
  torch = pytest.importorskip("torch")
  from cxr_jax.parity import torch_resnet
  net = torch_resnet.build_torch_reference("resnet50", seed=3)
  path = str(tmp_path_factory.mktemp("torch_resnet50") / "resnet50.pth")
  torch.save(net.state_dict(), path)
  return net, path


@pytest.mark.slow
def test_keras_resnet50_parity_both_layouts_at_224_and_299(keras50):
  check_keras_parity("resnet50", *keras50)


@pytest.mark.slow
def test_torchvision_resnet50_parity_at_224_and_299():
  check_torchvision_parity("resnet50")


@SLOW
@pytest.mark.parametrize("name", ["resnet101", "resnet152"])
def test_deeper_models_parity_every_source_and_layout(name, tmp_path):
  from cxr_jax.parity import keras as parity_keras
  net = size_free_keras(name, seed=0)
  check_keras_parity(name, net,
                     parity_keras.save_keras_weights(net, str(tmp_path), name),
                     sizes=DEEP_SIZES)
  del net
  check_torchvision_parity(name, sizes=DEEP_SIZES)


@SLOW
@pytest.mark.slow
def test_parity_check_runs_the_applications_through_the_registries():
  """`parity.resnet.CHECKS` (the `parity-check` command): Keras' fixed-size
  application in both layouts, through `weights.convert` and
  `models.build`, and torchvision, at 224 and 299."""
  pytest.importorskip("keras")
  errors = parity_resnet.CHECKS["resnet50"](sizes=(299, 224), batch=2,
                                            seed=0)
  sources = ["legacy", "keras3"]
  try:
    import torch  # noqa: F401
    sources.append("torchvision")
  except ImportError:
    pass
  assert sorted(errors) == sorted(f"{src}@{s}/{o}" for src in sources
                                  for s in SIZES
                                  for o in ("logits", "feature_map"))
  print(errors)
  for key, err in errors.items():
    assert err <= (BAR if key.endswith("logits") else MAP_BAR), key


@pytest.mark.parametrize("name", ["resnet50", *DEEP])
def test_torch_reference_has_torchvisions_parameter_count(name):
  pytest.importorskip("torch")
  from cxr_jax.parity import torch_resnet
  net = torch_resnet.build_torch_reference(name)
  assert torch_resnet.parameter_count(net) == TORCHVISION_COUNTS[name]
  assert torch_resnet.PUBLISHED_PARAMETERS[name] == TORCHVISION_COUNTS[name]


def test_converted_1000_class_file_loads_under_a_15_output_head(
    torch50, tmp_path):
  _, path = torch50
  out = str(tmp_path / "w.npz")
  meta = weights.convert("resnet50", "torchvision", path, out)
  assert meta["model_kwargs"] == {"variant": "torchvision",
                                  "input_norm": "torch"}
  name, kwargs = weights.architecture(out)
  model = models.build(name, num_classes=15, **kwargs)
  init = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype),
                                shapes(model, 64))
  merged = weights.merge_pretrained(init, weights.load_pretrained(out),
                                    dont_load=[r"^params/head/"])
  assert merged["params"]["head"]["kernel"].shape == (2048, 15)
  np.testing.assert_array_equal(
      merged["batch_stats"]["layer4"]["repeated"]["bn3"]["var"][1],
      torch50[0].state_dict()["layer4.2.bn3.running_var"].numpy())


def test_torchvision_converter_names_what_is_wrong(torch50, tmp_path, caplog):
  torch = pytest.importorskip("torch")
  net, path = torch50
  sd = net.state_dict()

  def save(sd):
    p = str(tmp_path / "bad.pth")
    torch.save(sd, p)
    return p

  missing = {k: v for k, v in sd.items()
             if k != "layer2.0.downsample.1.running_var"}
  with pytest.raises(ConversionError,
                     match=r"bad.pth: missing torchvision key "
                           r"'layer2.0.downsample.1.running_var'"):
    convert.convert_torchvision(save(missing), "resnet50")
  wrong = dict(sd, **{"layer3.1.conv2.weight": torch.zeros(256, 128, 3, 3)})
  with pytest.raises(ConversionError,
                     match=r"layer3/1/conv2/kernel: model shape "
                           r"\(3, 3, 256, 256\) != file shape"):
    convert.convert_torchvision(save(wrong), "resnet50")
  deeper = dict(sd, **{"layer3.6.conv1.weight": torch.zeros(256, 1024, 1, 1)})
  with pytest.raises(ConversionError, match=r"layer3\.6\.conv1\.weight"):
    convert.convert_torchvision(save(deeper), "resnet50")
  with pytest.raises(ConversionError, match="layer3.6.conv1.weight"):
    convert.convert_torchvision(path, "resnet101")
  text = tmp_path / "notes.pth"
  text.write_text("not a checkpoint")
  with pytest.raises(ConversionError, match="notes.pth is not a readable"):
    convert.convert_torchvision(str(text), "resnet50")
  with pytest.raises(ConversionError, match="not 'inception_v3'"):
    convert.convert_torchvision(path, "inception_v3")
  with caplog.at_level(logging.INFO, logger="cxr_jax.weights.resnet"):
    convert.convert_torchvision(path, "resnet50")
  assert "skipped torchvision entry bn1.num_batches_tracked" in caplog.text


def _copy_h5(src, dst, rename_layer=None, drop=(), weight_suffix=""):
  """A legacy Keras file with layers dropped or weight names changed."""
  with h5py.File(src) as f, h5py.File(dst, "w") as g:
    names = [n.decode() if isinstance(n, bytes) else n
             for n in f.attrs["layer_names"]]
    names = [n for n in names if n not in drop]
    g.attrs["layer_names"] = [n.encode() for n in names]
    for n in names:
      group = g.create_group(n)
      wnames = [w.decode() if isinstance(w, bytes) else w
                for w in f[n].attrs["weight_names"]]
      new = [w + weight_suffix for w in wnames]
      group.attrs["weight_names"] = [w.encode() for w in new]
      for w, w2 in zip(wnames, new):
        data = f[n][w][()]
        if rename_layer and n == rename_layer[0]:
          data = rename_layer[1](w, data)
        group.create_dataset(w2, data=data)


def test_keras_converter_names_what_is_wrong(keras50, tmp_path):
  _, paths = keras50
  legacy = paths["legacy"]
  # Keras 2 writes ':0' weight names; the conversion must not change.
  k2 = str(tmp_path / "k2.h5")
  _copy_h5(legacy, k2, weight_suffix=":0")
  a = flatten(convert.convert_keras(legacy, "resnet50")[0])
  b = flatten(convert.convert_keras(k2, "resnet50")[0])
  assert sorted(a) == sorted(b)
  assert all(np.array_equal(a[k], b[k]) for k in a)
  # include_top=False files: no head, the rest converts.
  notop = str(tmp_path / "notop.h5")
  _copy_h5(legacy, notop, drop=("predictions",))
  variables, meta = convert.convert_keras(notop, "resnet50")
  assert meta["num_classes"] is None and "head" not in variables["params"]

  dropped = str(tmp_path / "dropped.h5")
  _copy_h5(legacy, dropped, drop=("conv4_block2_3_bn",))
  with pytest.raises(ConversionError, match="no layer 'conv4_block2_3_bn'"):
    convert.convert_keras(dropped, "resnet50")
  reshaped = str(tmp_path / "reshaped.h5")
  _copy_h5(legacy, reshaped, rename_layer=(
      "conv3_block1_2_conv",
      lambda w, d: d[:1, :1] if "kernel" in w else d))
  with pytest.raises(ConversionError,
                     match=r"layer2/0/conv2/kernel: model shape "
                           r"\(3, 3, 128, 128\) != file shape "
                           r"\(1, 1, 128, 128\)"):
    convert.convert_keras(reshaped, "resnet50")
  for layout in ("legacy", "keras3"):
    with pytest.raises(ConversionError,
                       match=r"53 convolutions, but resnet101 has 104; the "
                             r"file fits resnet50"):
      convert.convert_keras(paths[layout], "resnet101")
  text = tmp_path / "notes.h5"
  text.write_text("not hdf5")
  with pytest.raises(ConversionError, match="notes.h5 is not a readable HDF5"):
    convert.convert_keras(str(text), "resnet50")
