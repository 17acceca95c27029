"""Every loss against a plain-numpy reference written from the paper's
equations, on random shapes and on all-negative / all-positive batches."""

import math

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax.sharding import Mesh, PartitionSpec as P

from cxr_jax import labels as label_names
from cxr_jax import losses


# ------------------------------------------------------- numpy references

def _sig(z):
  return 1.0 / (1.0 + np.exp(-z))


def _ln_f(z):       # ln sigmoid(z), float64, stable
  return -np.logaddexp(0.0, -z)


def _ln_1mf(z):     # ln(1 - sigmoid(z))
  return -np.logaddexp(0.0, z)


def ref_loss(name, z, y, **kw):
  """Per image: the paper's expression summed over classes; mean over images."""
  z, y = np.asarray(z, np.float64), np.asarray(y, np.float64)
  B, C = y.shape
  P_all, N_all = y.sum(), (1 - y).sum()
  P_c, N_c = y.sum(0), (1 - y).sum(0)
  total = 0.0
  with np.errstate(divide="ignore", invalid="ignore"):
    for i in range(B):
      s = 0.0
      for c in range(C):
        pos, neg = -_ln_f(z[i, c]), -_ln_1mf(z[i, c])
        if name == "cross_entropy":
          s += pos if y[i, c] else neg
        elif name == "mse":
          s += (_sig(z[i, c]) - y[i, c]) ** 2
        elif name == "w_cel":   # eqs. 1-3
          if kw.get("safe", True):
            beta_p = (P_all + N_all) / P_all if P_all else 0.0
            beta_n = (P_all + N_all) / N_all if N_all else 0.0
          else:
            beta_p = np.float64(P_all + N_all) / np.float64(P_all)
            beta_n = np.float64(P_all + N_all) / np.float64(N_all)
          # the faithful formula multiplies beta_P by the (possibly empty) sum
          s += beta_p * (pos if y[i, c] else 0.0) + beta_n * (
              0.0 if y[i, c] else neg)
        elif name == "cw_cel":  # eqs. 6-8
          a_p, a_n = P_all / (P_all + N_all), N_all / (P_all + N_all)
          s += a_n * pos if y[i, c] else a_p * neg
        elif name == "cw_cel_fine_grained":  # eqs. 9-11
          a_p, a_n = P_c[c] / (P_c[c] + N_c[c]), N_c[c] / (P_c[c] + N_c[c])
          if kw.get("no_positive") == "batch_alpha" and (
              P_c[c] == 0 or N_c[c] == 0):
            a_p, a_n = P_all / (P_all + N_all), N_all / (P_all + N_all)
          s += a_n * pos if y[i, c] else a_p * neg
        elif name == "focal":
          p = _sig(z[i, c])
          p_t = p if y[i, c] else 1 - p
          alpha = kw.get("alpha", 0.25)
          a_t = 1.0 if alpha is None else (alpha if y[i, c] else 1 - alpha)
          ln_pt = -pos if y[i, c] else -neg
          s += -a_t * (1 - p_t) ** kw.get("gamma", 2.0) * ln_pt
        elif name == "asymmetric":
          p = _sig(z[i, c])
          gp, gn, m = (kw.get("gamma_pos", 0.0), kw.get("gamma_neg", 4.0),
                       kw.get("clip", 0.05))
          if y[i, c]:
            s += -((1 - p) ** gp) * _ln_f(z[i, c])
          else:
            pm = max(p - m, 0.0)
            s += -(pm ** gn) * (math.log(1 - pm) if m > 0 else _ln_1mf(
                z[i, c]))
      total += s
  return total / B


CASES = [
    ("cross_entropy", {}), ("mse", {}), ("w_cel", {}),
    ("w_cel", {"safe": False}), ("cw_cel", {}), ("cw_cel_fine_grained", {}),
    ("cw_cel_fine_grained", {"no_positive": "batch_alpha"}), ("focal", {}),
    ("focal", {"gamma": 0.5, "alpha": None}), ("asymmetric", {}),
    ("asymmetric", {"gamma_pos": 1.0, "gamma_neg": 2.0, "clip": 0.0}),
]


def ours(name, z, y, **kw):
  return float(losses.LOSSES[name](jnp.asarray(z, jnp.float32),
                                   jnp.asarray(y, jnp.float32), **kw))


@st.composite
def batches(draw):
  # A few shapes, edges included: each new shape makes JAX compile every op
  # of the loss again, which would cost more than the checks themselves.
  b = draw(st.sampled_from([1, 2, 9]))
  c = draw(st.sampled_from([1, 3, 15]))
  z = draw(hnp.arrays(np.float32, (b, c), elements=st.floats(
      -12, 12, width=32)))
  kind = draw(st.sampled_from(["random", "all_negative", "all_positive"]))
  if kind == "random":
    y = draw(hnp.arrays(np.int8, (b, c), elements=st.integers(0, 1)))
  else:
    y = np.full((b, c), kind == "all_positive", np.int8)
  return z, y


@pytest.mark.parametrize("name,kw", CASES, ids=[f"{n}{k or ''}" for n, k in
                                                 CASES])
@settings(max_examples=40, deadline=None)
@given(batch=batches())
def test_matches_numpy_reference(name, kw, batch):
  z, y = batch
  expected = ref_loss(name, z, y, **kw)
  got = ours(name, z, y, **kw)
  if name == "w_cel" and kw.get("safe") is False and (
      y.sum() == 0 or (1 - y).sum() == 0):
    assert not math.isfinite(got) and not math.isfinite(expected)
    return
  assert math.isfinite(got)
  np.testing.assert_allclose(got, expected, rtol=2e-5, atol=1e-6)


def test_faithful_w_cel_is_nan_without_positives_and_safe_is_defined():
  z = np.random.default_rng(0).normal(size=(16, 14)).astype(np.float32)
  y = np.zeros((16, 14), np.float32)
  assert math.isnan(ours("w_cel", z, y, safe=False))
  # safe: beta_P = 0 (empty term), beta_N = 1 -> plain CE on the negatives
  np.testing.assert_allclose(ours("w_cel", z, y), ours("cross_entropy", z, y),
                             rtol=1e-6)


def test_fine_grained_class_without_positives_is_ignored_by_default():
  rng = np.random.default_rng(1)
  z = rng.normal(size=(16, 3)).astype(np.float32)
  y = (rng.random((16, 3)) < 0.3).astype(np.float32)
  y[:, 2] = 0  # a Hernia-like class: no positive in this batch
  moved = z.copy()
  moved[:, 2] += 5.0  # the class's logits do not matter when it is ignored
  assert ours("cw_cel_fine_grained", z, y) == pytest.approx(
      ours("cw_cel_fine_grained", moved, y), rel=1e-6)
  assert ours("cw_cel_fine_grained", z, y, no_positive="batch_alpha") != (
      pytest.approx(ours("cw_cel_fine_grained", moved, y,
                         no_positive="batch_alpha")))


@pytest.mark.parametrize("name,kw", CASES, ids=[f"{n}{k or ''}" for n, k in
                                                 CASES])
def test_gradients_are_finite_at_extreme_logits(name, kw):
  rng = np.random.default_rng(2)
  z = np.where(rng.random((8, 15)) < 0.5, -100.0, 100.0).astype(np.float32)
  y = (rng.random((8, 15)) < 0.3).astype(np.float32)
  fn = lambda z: losses.LOSSES[name](z, jnp.asarray(y), **kw)
  value, grad = jax.value_and_grad(fn)(jnp.asarray(z))
  assert np.isfinite(float(value)), name
  assert np.all(np.isfinite(np.asarray(grad))), name
  if name == "w_cel" and kw.get("safe") is False:
    _, grad0 = jax.value_and_grad(
        lambda z: losses.w_cel(z, jnp.zeros_like(z), safe=False))(
            jnp.asarray(z))
    assert not np.all(np.isfinite(np.asarray(grad0)))  # the documented case


@pytest.mark.parametrize("name,kw", CASES, ids=[f"{n}{k or ''}" for n, k in
                                                 CASES])
def test_eight_devices_equal_one_on_the_global_batch(name, kw):
  devices = np.array(jax.devices()[:8])
  assert devices.size == 8, "conftest sets 8 fake CPU devices"
  mesh = Mesh(devices, ("data",))
  rng = np.random.default_rng(3)
  z = rng.normal(0, 3, (16, 15)).astype(np.float32)
  y = (rng.random((16, 15)) < 0.15).astype(np.float32)
  y[:, 13] = 0
  y[5, 13] = 1  # one Hernia positive, on one device only
  fn = losses.LOSSES[name]
  single = jax.jit(lambda z, y: fn(z, y, **kw))(z, y)
  sharded = jax.jit(jax.shard_map(
      lambda z, y: fn(z, y, axis_name="data", **kw), mesh=mesh,
      in_specs=(P("data"), P("data")), out_specs=P()))(z, y)
  np.testing.assert_allclose(float(sharded), float(single), rtol=1e-6)
  # and gradients with respect to the logits
  g1 = jax.grad(lambda z: fn(z, y, **kw))(z)
  g8 = jax.jit(jax.shard_map(
      jax.grad(lambda z, y: fn(z, y, axis_name="data", **kw)), mesh=mesh,
      in_specs=(P("data"), P("data")), out_specs=P("data")))(z, y)
  np.testing.assert_allclose(np.asarray(g8), np.asarray(g1), rtol=1e-5,
                             atol=1e-8)


def test_mask_drops_padded_images():
  rng = np.random.default_rng(4)
  z = rng.normal(size=(10, 15)).astype(np.float32)
  y = (rng.random((10, 15)) < 0.3).astype(np.float32)
  mask = np.array([1] * 7 + [0] * 3, bool)
  for name, kw in CASES:
    if name == "w_cel" and kw:
      continue
    np.testing.assert_allclose(
        float(losses.LOSSES[name](z, y, mask=mask, **kw)),
        ours(name, z[:7], y[:7], **kw), rtol=1e-5, err_msg=name)


def test_aux_task_selects_15_or_14_outputs():
  rng = np.random.default_rng(5)
  z = rng.normal(size=(4, 15)).astype(np.float32)
  y = (rng.random((4, 15)) < 0.3).astype(np.float32)
  with_aux = losses.get_loss("cw_cel", aux_task=True)(z, y)
  without = losses.get_loss("cw_cel", aux_task=False)(z, y)
  assert float(with_aux) == pytest.approx(ours("cw_cel", z, y), rel=1e-6)
  assert float(without) == pytest.approx(
      ours("cw_cel", z[:, :label_names.NUM_DISEASES],
           y[:, :label_names.NUM_DISEASES]), rel=1e-6)
  with pytest.raises(ValueError, match="unknown loss 'bce'"):
    losses.get_loss("bce")
  with pytest.raises(ValueError, match="needs 15 outputs"):
    losses.get_loss("cw_cel", aux_task=True)(z[:, :14], y[:, :14])
