"""AUC against sklearn, the device AUC against the host, the bootstrap
against a slow replay, and DeLong against an O(mn) reference."""

import math
import warnings

import numpy as np
import pytest
import scipy.stats
from sklearn.metrics import roc_auc_score

from cxr_jax import metrics


def _data(n, c, seed, ties=True):
  rng = np.random.default_rng(seed)
  y = (rng.random((n, c)) < rng.uniform(0.02, 0.5, c)).astype(np.float32)
  s = rng.normal(size=(n, c)) + 1.2 * y
  if ties:
    s = np.round(s, 1)  # many ties
  return y, s.astype(np.float32)


def test_per_class_auc_equals_sklearn_with_ties():
  y, s = _data(3000, 14, 0)
  ours = metrics.per_class_auc(y, s)
  ref = np.array([roc_auc_score(y[:, c], s[:, c]) for c in range(14)])
  np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-9)


def test_single_valued_class_is_nan_with_a_named_warning():
  y, s = _data(200, 14, 1)
  y[:, 13] = 0
  with pytest.warns(RuntimeWarning, match="'Hernia'"):
    aucs = metrics.per_class_auc(y, s)
  assert math.isnan(aucs[13]) and not np.isnan(aucs[:13]).any()
  mean, count = metrics.mean_auc(aucs)
  assert count == 13 and mean == pytest.approx(np.mean(aucs[:13]))


def test_device_auc_agrees_with_host_on_25000_by_14():
  y, s = _data(25_000, 14, 2)
  host = metrics.per_class_auc(y, s)
  device = np.asarray(metrics.device_auc(y, s))
  err = np.abs(device - host).max()
  print(f"device vs host AUC, 25000x14 with ties: max |diff| {err:.2e}")
  assert err <= 1e-6


def test_device_auc_mask_and_undefined_classes():
  y, s = _data(500, 3, 3)
  y[:, 2] = 1
  mask = np.arange(500) < 400
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    host = metrics.per_class_auc(y[:400], s[:400])
  device = np.asarray(metrics.device_auc(y, s, mask))
  np.testing.assert_allclose(device[:2], host[:2], atol=1e-6)
  assert math.isnan(device[2])


def test_bootstrap_matches_a_slow_replay_of_the_same_resamples():
  y, s = _data(300, 4, 4)
  ci = metrics.bootstrap_ci(y, s, num_resamples=40, seed=7)
  rng = np.random.default_rng(7)
  idx = rng.integers(0, 300, size=(40, 300))
  slow = np.array([[roc_auc_score(y[i, c], s[i, c]) for c in range(4)]
                   for i in idx])
  np.testing.assert_allclose(ci.low, np.percentile(slow, 2.5, axis=0),
                             atol=1e-6)
  np.testing.assert_allclose(ci.high, np.percentile(slow, 97.5, axis=0),
                             atol=1e-6)
  assert ci.mean_low == pytest.approx(
      np.percentile(slow.mean(1), 2.5), abs=1e-6)
  assert np.all(ci.low <= ci.auc) and np.all(ci.auc <= ci.high)
  again = metrics.bootstrap_ci(y, s, num_resamples=40, seed=7)
  np.testing.assert_array_equal(again.low, ci.low)


def _slow_delong(y, a, b):
  """DeLong et al. 1988 from its definitions: psi kernel over all pairs."""
  pos, neg = y > 0.5, y <= 0.5
  m, n = pos.sum(), neg.sum()

  def psi(x, z):
    return 1.0 if x > z else 0.5 if x == z else 0.0

  def comps(s):
    v10 = np.array([np.mean([psi(x, z) for z in s[neg]]) for x in s[pos]])
    v01 = np.array([np.mean([psi(x, z) for x in s[pos]]) for z in s[neg]])
    return v10, v01

  (a10, a01), (b10, b01) = comps(a), comps(b)
  auc_a, auc_b = a10.mean(), b10.mean()
  s10 = lambda u, v: np.sum((u - u.mean()) * (v - v.mean())) / (len(u) - 1)
  var = (s10(a10, a10) + s10(b10, b10) - 2 * s10(a10, b10)) / m + (
      s10(a01, a01) + s10(b01, b01) - 2 * s10(a01, b01)) / n
  z = (auc_a - auc_b) / math.sqrt(var)
  return auc_a, auc_b, z, 2 * scipy.stats.norm.sf(abs(z))


def test_delong_equals_the_definition():
  rng = np.random.default_rng(5)
  y = (rng.random(120) < 0.3).astype(float)
  a = np.round(rng.normal(size=120) + 1.0 * y, 1)
  b = np.round(0.6 * a + rng.normal(size=120) * 0.8 + 0.3 * y, 1)
  got = metrics.delong_test(y, a, b)
  auc_a, auc_b, z, p = _slow_delong(y, a, b)
  assert got.auc_a == pytest.approx(auc_a, abs=1e-12)
  assert got.auc_b == pytest.approx(auc_b, abs=1e-12)
  assert got.auc_a == pytest.approx(roc_auc_score(y, a), abs=1e-12)
  assert got.z == pytest.approx(z, rel=1e-9)
  assert got.p_value == pytest.approx(p, rel=1e-9)
  same = metrics.delong_test(y, a, a)
  assert same.z == 0 and same.p_value == 1.0
  per_class = metrics.delong_per_class(np.stack([y, y], 1),
                                       np.stack([a, a], 1),
                                       np.stack([b, a], 1), ["x", "y"])
  assert per_class["x"].z == pytest.approx(z, rel=1e-9)
  with pytest.raises(ValueError, match="at least 2 positives"):
    metrics.delong_test(np.r_[1, 0, 0, 0], np.arange(4), np.arange(4))
