"""InceptionV3's structure: sizes, named features, dtype, parameter counts;
and `models.common.repeat`, which the deep families scan their blocks with."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.receptive_field import mass_radius
from conftest import SmallNet, random_variables
from cxr_jax import labels
from cxr_jax.models import FEATURE_MAP, InceptionV3, count_parameters
from cxr_jax.models.common import BatchNorm, max_pool, repeat
from cxr_jax.models.inception_v3 import feature_grid


def _shapes(model, size):
  return jax.eval_shape(lambda: model.init(jax.random.key(0),
                                           jnp.zeros((1, size, size, 3))))


# Jitted rather than eager: one compile of the whole network costs less on
# CPU than dispatching (and compiling) each of its hundreds of ops alone.
def _init(model, x, seed=0):
  return jax.jit(model.init)(jax.random.key(seed), x)


def _apply(model, variables, x, **kwargs):
  return jax.jit(functools.partial(model.apply, **kwargs))(variables, x)


@pytest.fixture(scope="module")
def full_network_variables():
  """The 15-output network's variables, drawn by numpy (what these tests
  check holds for any weights; compiling InceptionV3's init costs more than
  the tests). They do not depend on the input size."""
  return random_variables(InceptionV3(num_classes=15), 75)


@pytest.mark.slow
def test_parameter_counts_match_keras():
  pytest.importorskip("keras")
  from cxr_jax.parity import keras as keras_parity
  reference = keras_parity.build_keras_reference(
      keras_parity.KERAS_REFERENCES["inception_v3"], 299).count_params()
  ours = count_parameters(_shapes(InceptionV3(num_classes=1000), 299))
  head15 = count_parameters(_shapes(InceptionV3(num_classes=15), 299))
  print(f"parameters: 1000-way {ours:,} (keras {reference:,}); "
        f"15-way {head15:,}")
  assert ours == reference == 23_851_784
  # Only the head differs: 2048*15 + 15 instead of 2048*1000 + 1000.
  assert head15 == ours - 2048 * 985 - 985
  assert 21.8e6 < head15 < 21.9e6


def test_deepcxray_head_is_14_diseases_then_normal():
  assert labels.NUM_OUTPUTS == 15
  assert labels.OUTPUTS[labels.NORMAL_INDEX] == labels.NORMAL
  assert labels.DISEASES[0] == "Atelectasis"
  assert labels.DISEASES[-1] == "Hernia"
  assert labels.index("Pleural_Thickening") == labels.index(
      "Pleural Thickening")
  assert labels.index("Infiltrate") == labels.index("Infiltration")
  with pytest.raises(KeyError, match="Pneumonitis"):
    labels.index("Pneumonitis")


@pytest.mark.parametrize("size,grid", [(75, 1), (107, 2), (299, 8)])
@pytest.mark.slow
def test_features_are_reachable_by_name_at_any_size(size, grid,
                                                   full_network_variables):
  model = InceptionV3(num_classes=15)
  variables = full_network_variables
  logits, feats = _apply(model, variables, jnp.zeros((2, size, size, 3)),
                         return_features=True)
  assert logits.shape == (2, 15)
  assert feats[FEATURE_MAP].shape == (2, grid, grid, 2048)
  np.testing.assert_allclose(feats["pooled"],
                             feats[FEATURE_MAP].mean(axis=(1, 2)), rtol=1e-6)
  # The class maps are the head on every cell; their mean is the logits.
  assert feats["class_maps"].shape == (2, grid, grid, 15)
  np.testing.assert_allclose(feats["class_maps"].mean(axis=(1, 2)), logits,
                             atol=1e-5)
  assert model.feature_grid(size)[0] == grid


@pytest.mark.slow
def test_transition_head_pools_with_the_configured_lse_r():
  """Table 2's CEL(tran.): LSE pooling of the transition map with
  `lse_r`, then the head (a constant r would ignore config.model.lse_r)."""
  x = jax.random.uniform(jax.random.key(1), (2, 107, 107, 3), minval=-1)
  logits = {}
  variables = random_variables(InceptionV3(
      num_classes=15, depth_multiplier=0.125, transition_channels=16), 107)
  for r in (2.0, 10.0):
    model = InceptionV3(num_classes=15, depth_multiplier=0.125,
                        transition_channels=16, lse_r=r)
    logits[r], feats = _apply(model, variables, x, return_features=True)
    t = np.asarray(feats["transition"], np.float64)
    pooled = np.log(np.exp(r * t).mean((1, 2))) / r
    head = variables["params"]["head"]
    np.testing.assert_allclose(
        logits[r], pooled @ np.asarray(head["kernel"]) + head["bias"],
        rtol=1e-4, atol=1e-5)
  assert not np.allclose(logits[2.0], logits[10.0])


def test_registry_builds_by_name_and_names_a_bad_option():
  from cxr_jax import models
  model = models.build("inception_v3", num_classes=15, depth_multiplier=0.25)
  assert isinstance(model, InceptionV3) and model.depth_multiplier == 0.25
  with pytest.raises(models.ModelConfigError, match="config.model.depth"):
    models.build("inception_v3", depth=50)
  with pytest.raises(models.ModelConfigError, match="config.model_name"):
    models.build("inception_v9")


@pytest.mark.parametrize("norm", ["inception", "torch", "caffe",
                                  "caffe_bn_inception"])
def test_input_norms_map_minus_one_one_to_what_weights_expect(norm):
  from cxr_jax.models import common
  pixels = np.array([0.0, 64.0, 255.0])
  x = np.stack([pixels, pixels + 1, pixels + 2], -1)  # R, G, B
  got = np.asarray(common.normalize_input(jnp.asarray(x / 127.5 - 1), norm))
  order, mean, std = common.INPUT_NORMS[norm]
  rgb = x[..., ::-1] if order == "BGR" else x
  want = (rgb - np.asarray(mean)) / np.asarray(std)
  np.testing.assert_allclose(got, want, atol=1e-4)
  if norm == "inception":
    np.testing.assert_allclose(got, x / 127.5 - 1, atol=1e-6)


def test_rejects_inputs_below_75_pixels():
  model = InceptionV3(num_classes=15)
  with pytest.raises(ValueError, match="at least 75x75"):
    _shapes(model, 74)


@pytest.mark.slow
def test_bfloat16_computes_in_bf16_but_keeps_float32_parameters(
    full_network_variables):
  x = jax.random.uniform(jax.random.key(1), (2, 75, 75, 3), minval=-1, maxval=1)
  f32 = InceptionV3(num_classes=15)
  variables = full_network_variables
  bf16 = InceptionV3(num_classes=15, dtype=jnp.bfloat16)
  bf16_vars = _shapes(bf16, 75)
  assert {l.dtype for l in jax.tree_util.tree_leaves(bf16_vars)} == {
      jnp.dtype("float32")}
  ref = _apply(f32, variables, x)
  out, feats = _apply(bf16, variables, x, return_features=True)
  assert feats[FEATURE_MAP].dtype == jnp.bfloat16
  assert out.dtype == jnp.float32
  rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
  assert rel < 0.05, rel  # bf16 has 8 mantissa bits


@pytest.mark.slow
def test_training_mode_updates_batch_stats_and_uses_dropout():
  model = InceptionV3(num_classes=15, dropout_rate=0.5)
  x = jax.random.normal(jax.random.key(1), (4, 75, 75, 3))
  variables = random_variables(model, 75)
  train = jax.jit(lambda v, x, key: model.apply(
      v, x, train=True, mutable=["batch_stats"], rngs={"dropout": key}))
  logits, updates = train(variables, x, jax.random.key(2))
  other, _ = train(variables, x, jax.random.key(3))
  before = variables["batch_stats"]["Conv2d_1a_3x3"]["bn"]["mean"]
  after = updates["batch_stats"]["Conv2d_1a_3x3"]["bn"]["mean"]
  assert not np.allclose(before, after)
  assert "scale" not in variables["params"]["Conv2d_1a_3x3"]["bn"]
  assert not np.allclose(logits, other)  # dropout draws from the key


def test_the_shared_head_drops_out_in_training_only():
  """Every backbone's head (`common.classifier_head`), on the small network
  that uses it: dropout follows the key in training and is off at
  inference."""
  model = SmallNet(dropout_rate=0.5)
  x = jax.random.normal(jax.random.key(1), (4, 33, 33, 3))
  variables = _init(model, x)
  train = jax.jit(lambda v, x, key: model.apply(
      v, x, train=True, mutable=["batch_stats"], rngs={"dropout": key})[0])
  assert not np.allclose(train(variables, x, jax.random.key(2)),
                         train(variables, x, jax.random.key(3)))
  np.testing.assert_array_equal(train(variables, x, jax.random.key(2)),
                                train(variables, x, jax.random.key(2)))
  np.testing.assert_array_equal(_apply(model, variables, x),
                                _apply(SmallNet(), variables, x))
  assert not np.allclose(train(variables, x, jax.random.key(2)), jax.jit(
      lambda v, x: SmallNet().apply(v, x, train=True,
                                    mutable=["batch_stats"])[0])(variables, x))


def test_aux_branch_is_optional_and_needs_299():
  model = InceptionV3(num_classes=15, aux_logits=True)
  shapes = _shapes(model, 299)
  assert shapes["params"]["AuxLogits"]["fc"]["kernel"].shape == (768, 15)
  assert "AuxLogits" not in _shapes(InceptionV3(num_classes=15), 299)["params"]
  with pytest.raises(ValueError, match="auxiliary logits"):
    _shapes(model, 107)


def test_depth_multiplier_thins_every_layer_like_tf_slim():
  from cxr_jax.models.inception_v3 import scaled_depth
  thin = _shapes(InceptionV3(num_classes=15, depth_multiplier=0.25), 299)
  p = thin["params"]
  assert p["Conv2d_1a_3x3"]["conv"]["kernel"].shape == (3, 3, 3, 16)  # 32/4 -> floor 16
  assert p["Conv2d_4a_3x3"]["conv"]["kernel"].shape[-1] == 48
  assert p["head"]["kernel"].shape == (512, 15)  # Mixed_7c: 2048 / 4
  assert scaled_depth(192, 1.0) == 192 and scaled_depth(40, 0.1) == 16
  with pytest.raises(ValueError, match="depth_multiplier"):
    scaled_depth(64, 0.0)


@pytest.mark.parametrize("output_stride", [32, 16])
@pytest.mark.parametrize("size", [75, 139, 171, 299, 331])
def test_feature_grid_matches_mixed_7c(size, output_stride):
  model = InceptionV3(num_classes=15, depth_multiplier=0.125,
                      output_stride=output_stride)
  out = jax.eval_shape(
      lambda: model.init_with_output(jax.random.key(0),
                                     jnp.zeros((1, size, size, 3)),
                                     return_features=True)[0])
  cells, offset, stride = feature_grid(size, output_stride)
  assert out[1][FEATURE_MAP].shape[1:3] == (cells, cells)
  assert (offset, stride) == (37.5, float(output_stride))
  if size == 299:
    assert cells == {32: 8, 16: 15}[output_stride]
  # The grid is centred: as much margin after the last centre as before the
  # first, less the pixels the VALID layers drop.
  assert 0 <= size - (offset + stride * (cells - 1)) - offset < stride


@pytest.mark.slow
def test_lse_head_pools_the_class_maps():
  model = InceptionV3(num_classes=15, depth_multiplier=0.125,
                      head_pooling="lse", lse_r=10.0)
  x = jax.random.uniform(jax.random.key(1), (2, 139, 139, 3), minval=-1)
  variables = random_variables(model, 139)
  logits, feats = _apply(model, variables, x, return_features=True)
  maps = np.asarray(feats["class_maps"], np.float64)
  head = variables["params"]["head"]
  # The class maps are the CAMs plus the bias ...
  cam = np.tensordot(np.asarray(feats[FEATURE_MAP], np.float64),
                     np.asarray(head["kernel"], np.float64), axes=1)
  np.testing.assert_allclose(maps, cam + np.asarray(head["bias"]), atol=1e-5)
  # ... and a logit is their log-mean-exp at r = 10 (between mean and max).
  flat = maps.reshape(2, -1, 15)
  want = (np.log(np.exp(10 * flat).mean(1))) / 10
  np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)
  assert (logits >= flat.mean(1) - 1e-6).all() and (
      logits <= flat.max(1) + 1e-6).all()
  with pytest.raises(ValueError, match="head_pooling"):
    _shapes(InceptionV3(num_classes=15, head_pooling="max"), 139)


@pytest.mark.slow
def test_delta_init_starts_every_convolution_at_its_centre_tap():
  from cxr_jax.models.inception_v3 import delta_init
  kernel = np.asarray(delta_init()(jax.random.key(0), (7, 1, 64, 32)))
  assert np.count_nonzero(np.delete(kernel, 3, axis=0)) == 0
  # The centre keeps a 1x1 layer's scale: variance 1 / fan-in of one tap.
  assert abs(kernel[3, 0].var() * 64 - 1) < 0.2
  model = InceptionV3(num_classes=15, depth_multiplier=0.125,
                      conv_init="delta")
  params = _init(model, jnp.zeros((1, 75, 75, 3)))["params"]
  k = np.asarray(params["Mixed_6b"]["branch7x7dbl_2"]["conv"]["kernel"])
  assert k.shape[:2] == (7, 1) and np.abs(k[3]).sum() > 0
  assert np.count_nonzero(np.delete(k, 3, axis=0)) == 0
  with pytest.raises(ValueError, match="conv_init"):
    _shapes(InceptionV3(num_classes=15, conv_init="zeros"), 75)


@pytest.mark.slow
def test_delta_init_narrows_the_effective_receptive_field():
  """Radius (px) around the centre Mixed_7c cell that holds half of the
  input-gradient mass of that cell's features (its effective receptive
  field, Luo et al. 2016), from each initialisation."""
  size = 299
  x = jax.random.uniform(jax.random.key(2), (1, size, size, 3), minval=-1)
  cells, offset, stride = feature_grid(size)
  c = cells // 2
  # conv_init only changes init: one compiled gradient serves both.
  model = InceptionV3(num_classes=15, depth_multiplier=0.125)
  cell_sum = lambda variables, x: model.apply(
      variables, x, return_features=True)[1][FEATURE_MAP][0, c, c].sum()
  gradient = jax.jit(jax.grad(cell_sum, argnums=1))
  radius = {}
  for conv_init in ("lecun_normal", "delta"):
    variables = _init(InceptionV3(num_classes=15, depth_multiplier=0.125,
                                  conv_init=conv_init), x)
    grad = np.abs(np.asarray(gradient(variables, x)[0])).sum(-1)
    radius[conv_init] = mass_radius(grad, offset + stride * c)
  assert radius["delta"] < 0.7 * radius["lecun_normal"], radius


class _Residual(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    y = nn.BatchNorm(use_running_average=not train)(nn.Dense(x.shape[-1])(x))
    return x + nn.relu(y)


class _Repeated(nn.Module):
  unroll: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    return repeat(_Residual(name="group"), x, train, 3, self.unroll)


def _flops(fn, *args) -> float:
  analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
  return float((analysis[0] if isinstance(analysis, list) else analysis)
               ["flops"])


def test_repeat_gives_each_block_its_variables_and_unrolls_for_cost():
  x = jax.random.normal(jax.random.key(1), (4, 8))
  v = _Repeated().init(jax.random.key(0), x)
  kernel = v["params"]["group"]["Dense_0"]["kernel"]
  assert kernel.shape == (3, 8, 8)
  assert v["batch_stats"]["group"]["BatchNorm_0"]["mean"].shape == (3, 8)
  assert not np.allclose(kernel[0], kernel[1])  # drawn per block
  # The scan is the blocks applied in order, block i with slice i.
  block = lambda i: jax.tree_util.tree_map(lambda a: a[i], v)["params"][
      "group"]
  stats = lambda i: jax.tree_util.tree_map(lambda a: a[i], v)[
      "batch_stats"]["group"]
  for train in (False, True):
    want, means = x, []
    for i in range(3):
      want, new = _Residual().apply(
          {"params": block(i), "batch_stats": stats(i)}, want, train,
          mutable=["batch_stats"])
      means.append(new["batch_stats"]["BatchNorm_0"]["mean"])
    for unroll in (False, True):
      got, new = _Repeated(unroll).apply(v, x, train, mutable=["batch_stats"])
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(
          new["batch_stats"]["group"]["BatchNorm_0"]["mean"],
          np.stack(means), rtol=1e-5, atol=1e-6)
  # Unrolled, XLA's cost analysis counts every block (it counts a loop's
  # body once): what model_table.py and step_cost.py rely on.
  one = _flops(lambda p, s, x: _Residual().apply(
      {"params": p, "batch_stats": s}, x, False), block(0), stats(0), x)
  unrolled = _flops(lambda v, x: _Repeated(True).apply(v, x), v, x)
  assert abs(unrolled - 3 * one) <= 0.05 * 3 * one, (unrolled, one)


@pytest.mark.parametrize("shape,window,strides,padding", [
    ((2, 9, 9, 3), (3, 3), (2, 2), "VALID"),   # Inception stems, reductions
    ((2, 10, 11, 3), (3, 3), (2, 2), "SAME"),  # TF-slim's, even and odd
    ((1, 12, 12, 2), (3, 3), (2, 2), ((1, 1), (1, 1))),  # torchvision stems
    ((1, 12, 12, 2), (3, 3), (2, 2), ((0, 1), (0, 1))),  # Caffe's ceil mode
    ((2, 8, 8, 2), (2, 2), (2, 2), "VALID"),   # VGG
    ((1, 7, 7, 2), (3, 3), (1, 1), ((1, 1), (1, 1)))])  # BN-Inception
def test_max_pool_is_flax_max_pool_in_value_and_gradient(shape, window,
                                                         strides, padding):
  """Bit for bit. Inputs on a 0.5 grid: most windows hold ties, where only
  the first maximum (row-major) may take the gradient, as XLA's
  select-and-scatter gives it. Cotangents are random floats, so a cell under
  overlapping windows must also add them in select-and-scatter's order:
  any other order rounds differently, and a training run then drifts off
  the trajectory it followed before (the demo's CAM figures moved)."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(np.round(rng.normal(size=shape) * 2) / 2, jnp.float32)
  ref = lambda x: nn.max_pool(x, window, strides=strides, padding=padding)
  ours = lambda x: max_pool(x, window, strides, padding)
  want, ref_vjp = jax.vjp(ref, x)
  got, our_vjp = jax.vjp(ours, x)
  np.testing.assert_array_equal(got, want)
  g = jnp.asarray(rng.normal(size=want.shape), jnp.float32)
  np.testing.assert_array_equal(our_vjp(g)[0], ref_vjp(g)[0])
  np.testing.assert_array_equal(
      jax.jit(lambda x: jax.vjp(ours, x)[1](g)[0])(x),
      jax.jit(lambda x: jax.vjp(ref, x)[1](g)[0])(x))
  # Under jit, in bfloat16, as training runs it.
  xb, gb = x.astype(jnp.bfloat16), g.astype(jnp.bfloat16)
  np.testing.assert_array_equal(
      jax.jit(lambda x: jax.vjp(ours, x)[1](gb)[0])(xb),
      jax.vjp(ref, xb)[1](gb)[0])


@pytest.mark.parametrize("use_scale", [True, False])
@pytest.mark.parametrize("devices", [1, 2])
def test_batch_norm_is_flax_batch_norm(use_scale, devices):
  """Same variables, forward and running averages as flax.linen.BatchNorm
  (two-pass variance; synchronised over 'data' on two devices), and the
  gradients of x, scale and bias to float32 rounding."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(8, 5, 5, 6)) * 3 + 1, jnp.float32)
  w = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  axis = "data" if devices > 1 else None
  options = dict(momentum=0.9, epsilon=1e-3, use_scale=use_scale,
                 dtype=jnp.float32, axis_name=axis)
  ref = nn.BatchNorm(use_running_average=False, use_fast_variance=False,
                     **options)
  ours = BatchNorm(use_running_average=False, **options)
  variables = ref.init(jax.random.key(0), x)
  assert (jax.tree_util.tree_map(np.shape, variables) ==
          jax.tree_util.tree_map(np.shape, ours.init(jax.random.key(0), x)))
  variables = jax.tree_util.tree_map(
      lambda v: jnp.asarray(rng.normal(size=v.shape) + 1, jnp.float32),
      variables)

  def step(model, params, x, w):
    def loss(params, x):
      y, updates = model.apply(
          {"params": params, "batch_stats": variables["batch_stats"]}, x,
          mutable=["batch_stats"])
      total = jnp.sum(jnp.sin(y) * w)
      total = jax.lax.psum(total, axis) if axis else total
      return total, (y, updates["batch_stats"])
    (_, (y, stats)), grads = jax.value_and_grad(
        loss, argnums=(0, 1), has_aux=True)(params, x)
    return y, stats, grads

  def run(model):
    fn = functools.partial(step, model)
    if axis:
      mesh = jax.make_mesh((devices,), (axis,))
      rows = NamedSharding(mesh, P(axis))
      fn = jax.shard_map(fn, mesh=mesh, in_specs=(P(), P(axis), P(axis)),
                         out_specs=(P(axis), P(), (P(), P(axis))))
      args = (variables["params"], jax.device_put(x, rows),
              jax.device_put(w, rows))
    else:
      args = (variables["params"], x, w)
    return jax.jit(fn)(*args)

  (y_ref, stats_ref, grads_ref), (y, stats, grads) = run(ref), run(ours)
  np.testing.assert_array_equal(y, y_ref)
  for a, b in zip(jax.tree_util.tree_leaves(stats),
                  jax.tree_util.tree_leaves(stats_ref)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree_util.tree_leaves(grads),
                  jax.tree_util.tree_leaves(grads_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())
  # Inference: the running averages, exactly as flax applies them.
  apply = lambda m: m.apply(variables, x)
  np.testing.assert_array_equal(
      apply(BatchNorm(use_running_average=True, **options)),
      apply(nn.BatchNorm(use_running_average=True, **options)))


@pytest.mark.parametrize("pooling", ["lse", "avg"])
def test_bfloat16_backbone_feeds_a_float32_head(pooling):
  """The class maps and logits are the float32 head on the bf16 feature map:
  bf16 rounding of the cells' scores would coarsen LSE's weights and CAM."""
  model = SmallNet(dtype=jnp.bfloat16, head_pooling=pooling)
  x = jax.random.uniform(jax.random.key(1), (2, 75, 75, 3), minval=-1,
                         maxval=1)
  variables = model.init(jax.random.key(0), x)
  logits, out = model.apply(variables, x, return_features=True)
  features = out["feature_map"]
  assert features.dtype == jnp.bfloat16
  head = variables["params"]["head"]
  maps = jnp.einsum("bhwk,kc->bhwc", features.astype(jnp.float32),
                    head["kernel"],
                    precision=jax.lax.Precision.HIGHEST) + head["bias"]
  assert out["class_maps"].dtype == logits.dtype == jnp.float32
  np.testing.assert_allclose(out["class_maps"], maps, rtol=1e-6, atol=1e-6)
  # And not what bf16 arithmetic would give: the test can tell them apart.
  assert np.abs(np.asarray(maps.astype(jnp.bfloat16).astype(jnp.float32))
                - np.asarray(maps)).max() > 1e-3
  if pooling == "avg":
    np.testing.assert_allclose(logits, maps.mean(axis=(1, 2)), rtol=1e-5,
                               atol=1e-6)
