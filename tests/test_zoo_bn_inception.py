"""BN-Inception / Inception V2: both variants' architecture, the exact
PyTorch ceil_mode pooling, the pretrainedmodels converter, and parity with
pretrainedmodels' definition."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxr_jax import models, weights
from cxr_jax.models import bn_inception
from cxr_jax.models.common import count_parameters, grid_geometry
from cxr_jax.weights import bn_inception as convert
from cxr_jax.weights.common import (ConversionError, architecture, flatten,
                                    load_pretrained, save_converted,
                                    unflatten)

BAR = 1e-4  # max abs error on logits and the inception_5b map, float32
SLOW = pytest.mark.slow
# pretrainedmodels 0.7.4's BNInception(num_classes=1000): parameters.
CAFFE_PARAMETERS = 11_295_240
# tf_slim 1.1.0's inception_v2(num_classes=1001) under inception_arg_scope:
# trainable variables, and all variables (with BatchNorm moving statistics).
TF_SLIM_TRAINABLE = 11_179_361
TF_SLIM_VARIABLES = 11_199_137


def build(**kwargs):
  constructor, fixed = bn_inception.MODELS["bn_inception"]
  return constructor(**{**fixed, **kwargs})


def shapes(model, size):
  return jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, size, size, 3))))


def init(model, size, seed=0):
  """Random variables of `model`'s shapes, drawn with numpy: compiling
  `model.init` costs more than every forward pass of this file."""
  rng = np.random.default_rng(seed)
  flat = {}
  for collection, tree in shapes(model, size).items():
    for path, leaf in flatten(tree).items():
      shape, last = leaf.shape, path.rsplit("/", 1)[-1]
      if last == "kernel":
        value = rng.normal(0, 1 / np.sqrt(np.prod(shape[:-1])), shape)
      elif last in ("scale", "var"):
        value = rng.uniform(0.5, 1.5, shape)
      else:  # bias, mean
        value = rng.normal(0, 0.2, shape)
      flat[f"{collection}/{path}"] = jnp.asarray(value, jnp.float32)
  return unflatten(flat)


# --------------------------------------------------------------------------
# Pooling: PyTorch's ceil_mode and divisor rule, TF's 'SAME'
# --------------------------------------------------------------------------

# (size, kernel, stride, padding, ceil_mode): every window the Caffe net
# uses, plus stride-2 ceil windows over padding, where the divisor rule and
# the dropped last window matter.
TORCH_POOLS = [
    (112, 3, 2, 0, True), (56, 3, 2, 0, True), (75, 3, 2, 0, True),
    (28, 3, 1, 1, True), (9, 3, 1, 1, True),
    (8, 3, 2, 1, True), (9, 3, 2, 1, True), (10, 4, 3, 1, True),
    (7, 2, 2, 1, True), (10, 3, 2, 1, False), (11, 5, 3, 2, True),
]


@pytest.mark.parametrize("size,kernel,stride,pad,ceil", TORCH_POOLS)
def test_pools_match_torch(size, kernel, stride, pad, ceil):
  torch = pytest.importorskip("torch")
  F = torch.nn.functional
  x = np.random.default_rng(size).normal(size=(2, size, size + 1, 3)).astype(
      np.float32)
  tx = torch.from_numpy(x.transpose(0, 3, 1, 2))
  nhwc = lambda t: t.numpy().transpose(0, 2, 3, 1)
  want = nhwc(F.max_pool2d(tx, kernel, stride, pad, ceil_mode=ceil))
  got = np.asarray(bn_inception.max_pool(jnp.asarray(x), kernel, stride, pad,
                                         ceil))
  np.testing.assert_array_equal(got, want)
  for include in (True, False):
    want = nhwc(F.avg_pool2d(tx, kernel, stride, pad, ceil_mode=ceil,
                             count_include_pad=include))
    got = np.asarray(bn_inception.avg_pool(jnp.asarray(x), kernel, stride, pad,
                                           ceil, include))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_torch_avg_pool_divisor_counts_padding_not_the_overhang():
  # 8 cells, 3x3/2 padded 1, ceil: windows start at -1, 1, 3, 5, 7; the last
  # covers cell 7, one padding cell (counted) and one overhang (not).
  counts = bn_inception._pool_counts(8, 3, 2, 1, True, True)
  np.testing.assert_array_equal(counts, [3, 3, 3, 3, 2])
  counts = bn_inception._pool_counts(8, 3, 2, 1, True, False)
  np.testing.assert_array_equal(counts, [2, 3, 3, 3, 1])


@pytest.mark.parametrize("size", [7, 8, 28, 37])
def test_same_pools_are_tensorflows(size):
  import flax.linen as nn
  x = jnp.asarray(np.random.default_rng(size).normal(size=(1, size, size, 4)),
                  jnp.float32)
  for stride in (1, 2):
    np.testing.assert_array_equal(
        bn_inception.max_pool(x, 3, stride, "SAME"),
        nn.max_pool(x, (3, 3), (stride, stride), "SAME"))
    np.testing.assert_allclose(
        bn_inception.avg_pool(x, 3, stride, "SAME", count_include_pad=False),
        nn.avg_pool(x, (3, 3), (stride, stride), "SAME",
                    count_include_pad=False), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------
# Architecture
# --------------------------------------------------------------------------

def test_caffe_parameter_count_is_pretrainedmodels():
  params = shapes(build(num_classes=1000), 224)["params"]
  assert count_parameters(params) == CAFFE_PARAMETERS


def test_tf_slim_parameter_counts_are_tf_slims():
  variables = shapes(build(num_classes=1001, variant="tf_slim"), 224)
  assert count_parameters(variables["params"]) == TF_SLIM_TRAINABLE
  assert count_parameters(variables) == TF_SLIM_VARIABLES


def test_module_names_and_variant_differences():
  caffe = flatten(shapes(build(num_classes=3), 224)["params"])
  for key in ("conv1_7x7_s2/conv/kernel", "conv1_7x7_s2/conv/bias",
              "conv1_7x7_s2/bn/scale", "conv2_3x3_reduce/bn/bias",
              "inception_3a/1x1/conv/kernel",
              "inception_3c/double_3x3_2/bn/scale",
              "inception_5b/pool_proj/conv/bias", "head/kernel"):
    assert key in caffe, key
  assert "inception_3c/1x1/conv/kernel" not in caffe  # a reduction
  assert caffe["inception_4c/pool_proj/conv/kernel"].shape == (1, 1, 576, 128)
  assert caffe["inception_4e/3x3_reduce/conv/kernel"].shape == (
      1, 1, 608, 128)
  tf = flatten(shapes(build(num_classes=3, variant="tf_slim"), 224)["params"])
  assert tf["conv1_7x7_s2/depthwise/kernel"].shape == (7, 7, 1, 24)
  assert tf["conv1_7x7_s2/conv/kernel"].shape == (1, 1, 24, 64)
  assert "conv1_7x7_s2/conv/bias" in tf  # no BatchNorm after Conv2d_1a
  assert not any(k.startswith("conv1_7x7_s2/bn") for k in tf)
  assert "inception_3a/1x1/conv/bias" not in tf
  assert not any(k.endswith("bn/scale") for k in tf)
  assert tf["inception_4c/pool_proj/conv/kernel"].shape == (1, 1, 576, 96)
  assert tf["inception_4e/3x3_reduce/conv/kernel"].shape == (1, 1, 576, 128)


def test_tf_slim_depthwise_layout_is_tensorflows():
  # TF's depthwise filter [..., c, m] feeds output channel c * 8 + m, so its
  # (7, 7, 3, 8) kernel reshapes to our grouped (7, 7, 1, 24) one.
  rng = np.random.default_rng(0)
  tf_kernel = rng.normal(size=(7, 7, 3, 8)).astype(np.float32)
  x = rng.normal(size=(1, 16, 16, 3)).astype(np.float32)
  layer = bn_inception.SeparableConv1(variant="tf_slim")
  pointwise = np.zeros((1, 1, 24, 64), np.float32)
  pointwise[0, 0, np.arange(24), np.arange(24)] = 1.0  # pass channels on
  v = {"params": {
      "depthwise": {"kernel": jnp.asarray(tf_kernel.reshape(7, 7, 1, 24))},
      "conv": {"kernel": jnp.asarray(pointwise),
               "bias": jnp.zeros((64,), jnp.float32)}}}
  out = np.asarray(layer.apply(v, jnp.asarray(x), False))
  padded = np.pad(x, ((0, 0), (2, 3), (2, 3), (0, 0)))  # 'SAME', 16 px, /2
  for c, m in ((0, 0), (1, 3), (2, 7)):
    want = np.array([[np.sum(padded[0, 2 * i:2 * i + 7, 2 * j:2 * j + 7, c] *
                             tf_kernel[:, :, c, m]) for j in range(8)]
                     for i in range(8)])
    np.testing.assert_allclose(out[0, :, :, c * 8 + m], np.maximum(want, 0),
                               rtol=1e-4, atol=1e-4)


def _inputs(size, batch=2, seed=1):
  return jnp.asarray(np.random.default_rng(seed).uniform(
      -1, 1, (batch, size, size, 3)), jnp.float32)


@pytest.mark.parametrize("variant", ["caffe", "tf_slim"])
def test_class_maps_average_to_the_logits(variant):
  size = 64  # the Caffe net computes 63..70
  model = build(num_classes=4, variant=variant)
  logits, out = jax.jit(lambda v, x: model.apply(v, x, return_features=True))(
      init(model, size), _inputs(size))
  assert out["inception_5b"].shape == (2, 2, 2, 1024)
  assert out["feature_map"] is not None and logits.shape == (2, 4)
  np.testing.assert_allclose(out["class_maps"].mean((1, 2)), logits,
                             rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_lse_head_and_bfloat16():
  size = 64
  model = build(num_classes=4)
  v, x = init(model, size), _inputs(size)
  lse = build(num_classes=4, head_pooling="lse")
  lse_logits, out = jax.jit(lambda v, x: lse.apply(v, x, return_features=True))(
      v, x)
  assert lse_logits.shape == (2, 4) and np.all(np.isfinite(lse_logits))
  # LSE pooling lies between the mean and the max of each class map.
  maps = out["class_maps"]
  assert np.all(lse_logits >= maps.mean((1, 2)) - 1e-5)
  assert np.all(lse_logits <= maps.max((1, 2)) + 1e-5)
  half = build(num_classes=4, dtype=jnp.bfloat16)
  assert all(a.dtype == jnp.float32
             for a in jax.tree_util.tree_leaves(shapes(half, size)))
  h_logits, h_out = jax.jit(lambda v, x: half.apply(
      v, x, return_features=True))(v, x)
  assert h_logits.dtype == jnp.float32
  assert h_out["inception_5b"].dtype == jnp.bfloat16
  np.testing.assert_allclose(h_logits, maps.mean((1, 2)), rtol=0.1, atol=0.1)


def test_train_mode_updates_batch_statistics():
  model = build(num_classes=2, variant="tf_slim")
  v = init(model, 64)
  _, updates = jax.jit(lambda v, x: model.apply(
      v, x, train=True, mutable=["batch_stats"]))(v, _inputs(64))
  before = v["batch_stats"]["inception_3a"]["1x1"]["bn"]["mean"]
  after = updates["batch_stats"]["inception_3a"]["1x1"]["bn"]["mean"]
  # TF-slim's decay 0.9997: the running mean moves, by little.
  assert not np.allclose(before, after)
  np.testing.assert_allclose(before, after, atol=0.05)


def test_bad_inputs_and_options_are_clear_errors():
  model = build(num_classes=2)
  v = shapes(model, 64)
  apply = lambda x: jax.eval_shape(model.apply, v, x)
  with pytest.raises(ValueError, match="3 channels"):
    apply(jnp.zeros((1, 64, 64, 1)))
  with pytest.raises(ValueError, match="at least 32x32"):
    apply(jnp.zeros((1, 31, 31, 3)))
  with pytest.raises(ValueError, match="variant must be one of"):
    shapes(build(variant="keras"), 64)


# --------------------------------------------------------------------------
# Which sizes the Caffe net computes; the CAM grid
# --------------------------------------------------------------------------

def test_caffe_sizes_are_32m_minus_1_to_32m_plus_6():
  ok = [s for s in range(32, 330) if bn_inception.caffe_size_problem(s) is None]
  want = [s for m in range(1, 11) for s in range(32 * m - 1, 32 * m + 7)
          if 32 <= s < 330]
  assert ok == want
  assert bn_inception.nearest_caffe_sizes(299) == (294, 319)
  assert bn_inception.nearest_caffe_sizes(224) == (224, 224)
  assert bn_inception.computable_size(299) == 294
  assert bn_inception.computable_size(299, round_up=True) == 319
  assert bn_inception.computable_size(75) == 70
  assert bn_inception.computable_size(224) == 224
  assert bn_inception.computable_size(299, "tf_slim") == 299
  assert bn_inception.computable_size(20, "tf_slim") == 32


def test_caffe_refuses_299_like_upstream():
  with pytest.raises(ValueError, match=r"inception_3c .*19 rows.*18.*294 or "
                                       r"319 px.*tf_slim"):
    shapes(build(num_classes=2), 299)
  with pytest.raises(ValueError, match="299-px"):
    build().feature_grid(299)
  # Non-square inputs: each side must be a size the net computes.
  with pytest.raises(ValueError, match="299-px"):
    jax.eval_shape(lambda: build(num_classes=2).init(
        jax.random.key(0), jnp.zeros((1, 224, 299, 3))))


def test_pretrainedmodels_reference_fails_at_299_too():
  torch = pytest.importorskip("torch")
  from cxr_jax.parity import torch_bn_inception as ref
  net = ref.torch_module()(num_classes=2).eval()
  with torch.no_grad(), pytest.raises(RuntimeError, match="19.*18"):
    net(torch.zeros(1, 3, 299, 299))


@pytest.mark.parametrize("variant,sizes", [("caffe", (224, 294)),
                                           ("tf_slim", (224, 299))])
def test_feature_grid_matches_the_map(variant, sizes):
  model = build(num_classes=2, variant=variant)
  for size in sizes:
    cells, _, stride = model.feature_grid(size)
    fmap = jax.eval_shape(
        lambda v: model.apply(v, jnp.zeros((1, size, size, 3)),
                              return_features=True)[1]["inception_5b"],
        shapes(model, size))
    assert fmap.shape[1:3] == (cells, cells), (size, fmap.shape)
    assert stride == 32


def test_feature_grid_offsets_by_hand():
  # Caffe at 224: conv1 7x7/2 pad 3 centres cell i at 0.5 + 2i; the ceil
  # pools (no padding) move it by (3 - 1) / 2 = 1 cell: +2 and +4 px; each
  # reduction's union window [2i - 1, 2i + 2] by half a cell: +4 and +8.
  assert build().feature_grid(224) == (7, 0.5 + 2 + 4 + 4 + 8, 32)
  # TF-slim at 224: 'SAME' on even sizes pads (k - s) // 2 before: conv1
  # (7 on 224 -> pad 2 before) centres at 0.5 + (3 - 2) = 1.5, each 3x3/2
  # (pad 0 before) adds a whole cell: 1.5 + 2 + 4 + 8 + 16.
  assert build(variant="tf_slim").feature_grid(224) == (7, 31.5, 32)
  # At 299 the odd maps (75, 19) pad 1 before and add nothing.
  assert build(variant="tf_slim").feature_grid(299) == (10, 10.5, 32)
  # 'SAME' windows are grid_geometry's.
  for size in (224, 299, 300):
    assert build(variant="tf_slim").feature_grid(size) == grid_geometry(
        size, [(7, 2, "SAME")] + [(3, 2, "SAME")] * 4)


# --------------------------------------------------------------------------
# pretrainedmodels converter and parity
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """A random pretrainedmodels BNInception, its .pth and the converted npz."""
  torch = pytest.importorskip("torch")
  from cxr_jax.parity import torch_bn_inception as ref
  net = ref.build_torch_reference(seed=0)
  tmp = tmp_path_factory.mktemp("bn_inception")
  pth = str(tmp / "bn_inception.pth")
  torch.save(net.state_dict(), pth)
  npz = str(tmp / "bn_inception.npz")
  save_converted(npz, *convert.convert_pretrainedmodels(pth))
  return net, pth, npz


def test_reference_is_pretrainedmodels_size(reference):
  from cxr_jax.parity import torch_bn_inception as ref
  net, _, _ = reference
  assert ref.parameter_count(net) == ref.UPSTREAM_PARAMETERS == CAFFE_PARAMETERS
  sd = net.state_dict()
  assert list(sd)[:7] == [
      "conv1_7x7_s2.weight", "conv1_7x7_s2.bias", "conv1_7x7_s2_bn.weight",
      "conv1_7x7_s2_bn.bias", "conv1_7x7_s2_bn.running_mean",
      "conv1_7x7_s2_bn.running_var", "conv1_7x7_s2_bn.num_batches_tracked"]
  assert tuple(sd["inception_5b_pool_proj.weight"].shape) == (128, 1024, 1, 1)
  assert tuple(sd["last_linear.weight"].shape) == (1000, 1024)


@pytest.mark.parametrize("size", [224, 294])
@pytest.mark.slow
def test_pretrainedmodels_parity(reference, size):
  from cxr_jax.parity import torch_bn_inception as ref
  net, _, npz = reference
  name, kwargs = architecture(npz)
  assert (name, kwargs) == ("bn_inception", {
      "variant": "caffe", "input_norm": "caffe_bn_inception"})
  x = np.random.default_rng(size).uniform(-1, 1, (2, size, size, 3)).astype(
      np.float32)
  t_logits, t_map = ref.torch_outputs(net, x)
  f_logits, f_map = ref.flax_outputs(load_pretrained(npz), x, **kwargs)
  assert np.max(np.abs(f_logits - t_logits)) <= BAR
  assert np.max(np.abs(f_map - t_map)) <= BAR
  # Not vacuous: the logits vary across images and classes.
  assert np.std(t_logits) > 1e-2


@SLOW
def test_parity_check_maps_299_to_294():
  pytest.importorskip("torch")
  from cxr_jax.parity import bn_inception as parity
  errors = parity.CHECKS["bn_inception"](sizes=(299,), batch=1)
  assert set(errors) == {"pretrainedmodels@294/logits",
                         "pretrainedmodels@294/feature_map"}
  assert max(errors.values()) <= BAR


@SLOW
@pytest.mark.slow
def test_pretrainedmodels_parity_more_sizes():
  pytest.importorskip("torch")
  from cxr_jax.parity import torch_bn_inception as ref
  errors = ref.torch_parity(sizes=(288, 319), batch=2, seed=3)
  assert len(errors) == 4 and max(errors.values()) <= BAR, errors


def test_registry_round_trip(reference, tmp_path, monkeypatch):
  for name, row in bn_inception.MODELS.items():
    monkeypatch.setitem(models.MODELS, name, row)
    monkeypatch.setitem(weights.CONVERTERS, name, convert.SOURCES)
  _, pth, npz = reference
  out = str(tmp_path / "via_registry.npz")
  meta = weights.convert("bn_inception", "pretrainedmodels", pth, out)
  assert meta["source"] == "pretrainedmodels" and meta["num_classes"] == 1000
  assert meta["model_kwargs"] == {"variant": "caffe",
                                  "input_norm": "caffe_bn_inception"}
  model = models.build("bn_inception", num_classes=15, **meta["model_kwargs"])
  fresh = init(model, 64)
  merged = weights.merge_pretrained(fresh, load_pretrained(out),
                                    dont_load=[r"^params/head/"])
  np.testing.assert_array_equal(
      merged["params"]["inception_4d"]["3x3"]["conv"]["kernel"],
      load_pretrained(npz)["params"]["inception_4d"]["3x3"]["conv"]["kernel"])
  assert merged["params"]["head"]["kernel"].shape == (1024, 15)


def _edited(reference, tmp_path, edit):
  """Saves the reference's state dict after `edit(sd)`; returns the path."""
  import torch
  sd = dict(reference[0].state_dict())
  edit(sd)
  path = str(tmp_path / "edited.pth")
  torch.save(sd, path)
  return path


def test_converter_names_a_missing_key(reference, tmp_path):
  path = _edited(reference, tmp_path,
                 lambda sd: sd.pop("inception_4a_3x3_bn.running_var"))
  with pytest.raises(ConversionError, match=r"edited\.pth.*"
                     r"'inception_4a_3x3_bn\.running_var'"):
    convert.convert_pretrainedmodels(path)


def test_converter_names_a_mismatched_shape(reference, tmp_path):
  import torch

  def edit(sd):
    sd["inception_4c_pool_proj.weight"] = torch.zeros(96, 576, 1, 1)
    sd["inception_4c_pool_proj.bias"] = torch.zeros(96)
  path = _edited(reference, tmp_path, edit)
  with pytest.raises(ConversionError,
                     match=r"(?s)edited\.pth.*inception_4c/pool_proj/conv/"
                     r"kernel: model shape \(1, 1, 576, 128\)"):
    convert.convert_pretrainedmodels(path)


def test_converter_names_a_stray_key(reference, tmp_path):
  import torch
  path = _edited(reference, tmp_path, lambda sd: sd.__setitem__(
      "inception_6a_1x1.weight", torch.zeros(1)))
  with pytest.raises(ConversionError, match="inception_6a_1x1.weight"):
    convert.convert_pretrainedmodels(path)


def test_converter_rejects_a_wrong_file_and_model(tmp_path, reference):
  bad = tmp_path / "not_a_state_dict.pth"
  bad.write_bytes(b"certainly not a pickle")
  with pytest.raises(ConversionError, match="not_a_state_dict.pth"):
    convert.convert_pretrainedmodels(str(bad))
  with pytest.raises(ConversionError, match="not 'resnet50'"):
    convert.convert_pretrainedmodels(reference[1], "resnet50")


def test_converter_strips_module_prefix_and_logs_skips(reference, tmp_path,
                                                       caplog):
  import torch
  sd = {f"module.{k}": v for k, v in reference[0].state_dict().items()}
  path = str(tmp_path / "dataparallel.pth")
  torch.save(sd, path)
  with caplog.at_level(logging.INFO, logger="cxr_jax.weights.bn_inception"):
    variables, _ = convert.convert_pretrainedmodels(path)
  assert "skipped pretrainedmodels entry conv1_7x7_s2_bn.num_batches_tracked" \
      in caplog.text
  want = load_pretrained(reference[2])
  got = flatten(variables)
  for key, value in flatten(want).items():
    np.testing.assert_array_equal(got[key], value)
