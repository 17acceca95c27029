"""ROC AUC per class (host and jitted device versions), bootstrap confidence
intervals, and the DeLong test for two models on the same images.

All AUCs are the Mann-Whitney statistic with ties counted one half, which is
exactly `sklearn.metrics.roc_auc_score`:

    AUC = (1 / (P N)) sum_{i positive} [#neg below s_i + 0.5 #neg tied with s_i]
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats

from cxr_jax import labels as label_names


def _check(labels, scores):
  labels, scores = np.asarray(labels), np.asarray(scores)
  if labels.ndim == 1:
    labels, scores = labels[:, None], scores[:, None]
  if labels.shape != scores.shape or labels.ndim != 2:
    raise ValueError(f"labels {labels.shape} and scores {scores.shape} must "
                     f"both be [images, classes]")
  return labels, scores


def _names(num_classes, class_names):
  if class_names is None:
    class_names = (label_names.DISEASES if num_classes == 14 else
                   [f"class {i}" for i in range(num_classes)])
  return list(class_names)


# --------------------------------------------------------------------------
# Host
# --------------------------------------------------------------------------

def per_class_auc(labels, scores, class_names: Sequence[str] | None = None
                  ) -> np.ndarray:
  """ROC AUC of each class (float64). A class whose labels take a single value
  has no AUC: it gets NaN and a warning that names it."""
  labels, scores = _check(labels, scores)
  names = _names(labels.shape[1], class_names)
  aucs = np.full(labels.shape[1], np.nan)
  for c in range(labels.shape[1]):
    y = labels[:, c] > 0.5
    num_pos = int(y.sum())
    num_neg = y.size - num_pos
    if num_pos == 0 or num_neg == 0:
      warnings.warn(f"AUC undefined for {names[c]!r}: all {y.size} labels are "
                    f"{int(num_pos > 0)}", RuntimeWarning, stacklevel=2)
      continue
    ranks = scipy.stats.rankdata(scores[:, c])  # midranks for ties
    aucs[c] = (ranks[y].sum() - num_pos * (num_pos + 1) / 2) / (
        num_pos * num_neg)
  return aucs


def mean_auc(aucs) -> tuple[float, int]:
  """(mean over the classes whose AUC is defined, how many those are)."""
  aucs = np.asarray(aucs, np.float64)
  defined = ~np.isnan(aucs)
  count = int(defined.sum())
  return (float(aucs[defined].mean()) if count else math.nan), count


# --------------------------------------------------------------------------
# Device (jit)
# --------------------------------------------------------------------------

_CHUNK = 1024


@jax.jit
def device_auc(labels, scores, mask=None):
  """Per-class ROC AUC, jit-compiled, for scores that are already on the
  device (the loop and `evaluate` gather to the host and use
  `per_class_auc`; benchmarks/losses.py compares the two).

  labels, scores: [images, classes]; mask: optional [images] (padding = 0).
  Undefined classes are NaN. Agrees with `per_class_auc` to ~1e-7.

  One sort of all classes at once, then linear scans: within a run of tied
  scores, every positive beats the negatives of lower runs and ties the
  negatives of its own run. Twice a positive's placement is then
  (negatives before its run) + (negatives up to the end of its run), an
  integer, summed exactly in int32 chunks.
  """
  n = labels.shape[0]
  weights = (jnp.ones((n, 1), jnp.int32) if mask is None else
             mask.astype(jnp.int32)[:, None])
  is_pos = (labels > 0.5).astype(jnp.int32)
  pos_w = jnp.broadcast_to(is_pos * weights, labels.shape)
  neg_w = jnp.broadcast_to((1 - is_pos) * weights, labels.shape)
  s, pos_w, neg_w = jax.lax.sort(
      (scores.astype(jnp.float32), pos_w, neg_w), dimension=0, num_keys=1)
  neg_incl = jnp.cumsum(neg_w, axis=0)
  neg_excl = neg_incl - neg_w
  first = jnp.concatenate([jnp.ones_like(s[:1], bool), s[1:] != s[:-1]])
  last = jnp.concatenate([s[1:] != s[:-1], jnp.ones_like(s[:1], bool)])
  before_run = jax.lax.cummax(jnp.where(first, neg_excl, 0), axis=0)
  big = jnp.iinfo(jnp.int32).max
  through_run = jax.lax.cummin(jnp.where(last, neg_incl, big), axis=0,
                               reverse=True)
  twice = pos_w * (before_run + through_run)
  pad = (-n) % _CHUNK
  chunks = jnp.pad(twice, ((0, pad), (0, 0))).reshape(-1, _CHUNK,
                                                       twice.shape[1])
  total = jnp.sum(jnp.sum(chunks, axis=1).astype(jnp.float32), axis=0)
  num_pos = jnp.sum(pos_w, axis=0).astype(jnp.float32)
  num_neg = jnp.sum(neg_w, axis=0).astype(jnp.float32)
  auc = total / (2.0 * num_pos * num_neg)
  return jnp.where((num_pos > 0) & (num_neg > 0), auc, jnp.nan)


# --------------------------------------------------------------------------
# Bootstrap confidence intervals
# --------------------------------------------------------------------------

class BootstrapCI(NamedTuple):
  auc: np.ndarray       # [classes] point estimates
  low: np.ndarray       # [classes]
  high: np.ndarray      # [classes]
  mean: float           # mean AUC over defined classes
  mean_low: float
  mean_high: float
  num_resamples: int


@jax.jit
def _resampled_aucs(labels, scores, indices):
  return jax.vmap(lambda idx: device_auc(labels[idx], scores[idx]))(indices)


def bootstrap_ci(labels, scores, num_resamples: int = 1000, seed: int = 0,
                 confidence: float = 0.95, chunk: int = 50) -> BootstrapCI:
  """Percentile bootstrap CIs per class and for the mean AUC.

  Images are resampled with replacement (`num_resamples` times, from
  `seed`); each resample's AUCs come from the jitted device AUC. A resample in
  which a class has a single label value is left out of that class's interval
  (and the mean of that resample is over its defined classes).
  """
  labels, scores = _check(labels, scores)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    point = per_class_auc(labels, scores)
  rng = np.random.default_rng(seed)
  n = labels.shape[0]
  lab, sco = jnp.asarray(labels, jnp.float32), jnp.asarray(scores,
                                                           jnp.float32)
  samples = []
  for start in range(0, num_resamples, chunk):
    size = min(chunk, num_resamples - start)
    idx = rng.integers(0, n, size=(size, n))
    if size < chunk:  # keep one compiled shape
      idx = np.concatenate([idx, np.zeros((chunk - size, n), idx.dtype)])
    samples.append(np.asarray(_resampled_aucs(lab, sco,
                                              jnp.asarray(idx)))[:size])
  samples = np.concatenate(samples).astype(np.float64)
  tail = (1 - confidence) / 2 * 100
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    low = np.nanpercentile(samples, tail, axis=0)
    high = np.nanpercentile(samples, 100 - tail, axis=0)
    means = np.nanmean(samples, axis=1)
  mean, _ = mean_auc(point)
  return BootstrapCI(point, low, high, mean,
                     float(np.nanpercentile(means, tail)),
                     float(np.nanpercentile(means, 100 - tail)),
                     num_resamples)


# --------------------------------------------------------------------------
# DeLong
# --------------------------------------------------------------------------

class DeLongResult(NamedTuple):
  auc_a: float
  auc_b: float
  z: float
  p_value: float
  variance: float  # of auc_a - auc_b


def _placements(pos_scores, neg_scores):
  """Structural components of DeLong et al. 1988 via midranks (Sun & Xu 2014):
  V10[i] = fraction of negatives a positive i beats (ties 1/2),
  V01[j] = fraction of positives that beat negative j (ties 1/2)."""
  m, n = len(pos_scores), len(neg_scores)
  both = np.concatenate([pos_scores, neg_scores])
  r_all = scipy.stats.rankdata(both)
  r_pos = scipy.stats.rankdata(pos_scores)
  r_neg = scipy.stats.rankdata(neg_scores)
  v10 = (r_all[:m] - r_pos) / n
  v01 = 1.0 - (r_all[m:] - r_neg) / m
  return v10, v01


def delong_test(labels, scores_a, scores_b) -> DeLongResult:
  """DeLong's test (DeLong, DeLong & Clarke-Pearson 1988) that two correlated
  ROC AUCs, of two models scored on the same images, are equal. Two-sided."""
  y = np.asarray(labels).ravel() > 0.5
  a, b = np.asarray(scores_a, np.float64).ravel(), np.asarray(
      scores_b, np.float64).ravel()
  if not (y.shape == a.shape == b.shape):
    raise ValueError("labels and both score vectors must have one entry per "
                     "image")
  m, n = int(y.sum()), int((~y).sum())
  if m < 2 or n < 2:
    raise ValueError(f"DeLong needs at least 2 positives and 2 negatives; "
                     f"got {m} and {n}")
  v10_a, v01_a = _placements(a[y], a[~y])
  v10_b, v01_b = _placements(b[y], b[~y])
  s10 = np.cov(np.stack([v10_a, v10_b]))
  s01 = np.cov(np.stack([v01_a, v01_b]))
  cov = s10 / m + s01 / n
  var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
  auc_a, auc_b = float(v10_a.mean()), float(v10_b.mean())
  if var <= 0:
    z = 0.0 if auc_a == auc_b else math.copysign(math.inf, auc_a - auc_b)
  else:
    z = (auc_a - auc_b) / math.sqrt(var)
  p = float(2 * scipy.stats.norm.sf(abs(z)))
  return DeLongResult(auc_a, auc_b, float(z), p, var)


def delong_per_class(labels, scores_a, scores_b,
                     class_names: Sequence[str] | None = None
                     ) -> dict[str, DeLongResult]:
  """DeLong's test for each class whose labels hold both values."""
  labels, scores_a = _check(labels, scores_a)
  _, scores_b = _check(labels, scores_b)
  names = _names(labels.shape[1], class_names)
  out = {}
  for c, name in enumerate(names):
    y = labels[:, c] > 0.5
    if 2 <= y.sum() <= y.size - 2:
      out[name] = delong_test(y, scores_a[:, c], scores_b[:, c])
  return out
