"""The paper's objectives (and two modern baselines), exact and jit-friendly.

Conventions shared by every loss:

* `logits` and binary `labels` have shape `[batch, classes]`; the result is a
  scalar. The per-image loss is the paper's expression summed over classes;
  the batch loss is the mean over images.
* Everything is computed from logits: log(sigmoid(z)) = log_sigmoid(z) and
  log(1 - sigmoid(z)) = log_sigmoid(-z), which stay finite at any |z|.
* Every count (|P|, |N|, P_c, N_c, the number of images) is taken over the
  **global** batch. Under `shard_map`/`pmap`, pass `axis_name='data'`: counts
  and sums are `psum`-med over the axis, so each of N devices returns exactly
  the loss that one device computes on the whole global batch.
* An optional boolean `mask` of shape `[batch]` drops padded images (the last
  partial batch of an evaluation) from every count and from the mean.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from cxr_jax import labels as label_names
# Losses see bfloat16 logits in float32; float64 (the exactness tests) stays.
from cxr_jax.models.common import at_least_float32

Array = jax.Array
LossFn = Callable[..., Array]


# --------------------------------------------------------------------------
# Global-batch reductions
# --------------------------------------------------------------------------

def _psum(x, axis_name):
  return x if axis_name is None else jax.lax.psum(x, axis_name)


def _image_weights(labels, mask):
  if mask is None:
    return jnp.ones(labels.shape[:1], jnp.float32)
  return mask.astype(jnp.float32)


def _batch_mean(per_image, weights, axis_name):
  """Mean over the images of the global batch."""
  total = _psum(jnp.sum(per_image * weights), axis_name)
  count = _psum(jnp.sum(weights), axis_name)
  return total / count


def _counts(labels, weights, axis_name, per_class: bool):
  """(positives, negatives) over the global batch, per class or in total."""
  y = labels.astype(jnp.float32) * weights[:, None]
  n = (1.0 - labels.astype(jnp.float32)) * weights[:, None]
  axis = 0 if per_class else None
  return (_psum(jnp.sum(y, axis=axis), axis_name),
          _psum(jnp.sum(n, axis=axis), axis_name))


def _log_terms(logits, labels):
  """(-y ln f(x), -(1-y) ln(1-f(x))) elementwise, from logits."""
  logits = at_least_float32(logits)
  y = labels.astype(logits.dtype)
  pos = -y * jax.nn.log_sigmoid(logits)
  neg = -(1.0 - y) * jax.nn.log_sigmoid(-logits)
  return pos, neg


# --------------------------------------------------------------------------
# The paper's family
# --------------------------------------------------------------------------

def cross_entropy(logits, labels, *, mask=None, axis_name=None) -> Array:
  """Plain sigmoid cross-entropy (Table 2's CEL rows)."""
  pos, neg = _log_terms(logits, labels)
  w = _image_weights(labels, mask)
  return _batch_mean(jnp.sum(pos + neg, axis=-1), w, axis_name)


def mse(logits, labels, *, mask=None, axis_name=None) -> Array:
  """Squared error of the sigmoid outputs, summed over classes (MSE rows)."""
  p = jax.nn.sigmoid(at_least_float32(logits))
  per_image = jnp.sum((p - labels.astype(p.dtype)) ** 2, axis=-1)
  return _batch_mean(per_image, _image_weights(labels, mask), axis_name)


def w_cel(logits, labels, *, safe: bool = True, mask=None,
          axis_name=None) -> Array:
  """Weighted cross-entropy of Wang et al. 2017 (paper eqs. 1-3).

      L = beta_P * sum_{y=1} -ln f(x) + beta_N * sum_{y=0} -ln(1 - f(x)),
      beta_P = (|P| + |N|) / |P|,   beta_N = (|P| + |N|) / |N|,

  with |P| and |N| the ones and zeros of the global batch's label matrix.

  `safe=False` is the faithful formula: a batch with |P| = 0 gives
  beta_P = inf and inf * 0 = NaN, which is what stopped the paper's W-CEL runs
  (Section IV-C); reproducing Table 1 needs it. `safe=True` (the default)
  defines the empty case: a term with no elements (|P| = 0 or |N| = 0) gets
  weight 0, because the sum it multiplies is empty; the other term keeps its
  formula (then beta = 1). Gradients are finite in every case.
  """
  pos, neg = _log_terms(logits, labels)
  w = _image_weights(labels, mask)
  num_pos, num_neg = _counts(labels, w, axis_name, per_class=False)
  total = num_pos + num_neg
  if safe:
    beta_p = jnp.where(num_pos > 0, total / jnp.maximum(num_pos, 1.0), 0.0)
    beta_n = jnp.where(num_neg > 0, total / jnp.maximum(num_neg, 1.0), 0.0)
  else:
    beta_p, beta_n = total / num_pos, total / num_neg
  per_image = beta_p * jnp.sum(pos, -1) + beta_n * jnp.sum(neg, -1)
  return _batch_mean(per_image, w, axis_name)


def cw_cel(logits, labels, *, mask=None, axis_name=None) -> Array:
  """The paper's CW-CEL (eqs. 6-8): weights that shrink instead of grow.

      L = alpha_N * sum_{y=1} -ln f(x) + alpha_P * sum_{y=0} -ln(1 - f(x)),
      alpha_P = |P| / (|P| + |N|),   alpha_N = |N| / (|P| + |N|).

  Always finite. An all-negative batch has alpha_P = 0, so its loss is 0, as
  the equation says.
  """
  pos, neg = _log_terms(logits, labels)
  w = _image_weights(labels, mask)
  num_pos, num_neg = _counts(labels, w, axis_name, per_class=False)
  total = num_pos + num_neg
  alpha_p, alpha_n = num_pos / total, num_neg / total
  per_image = alpha_n * jnp.sum(pos, -1) + alpha_p * jnp.sum(neg, -1)
  return _batch_mean(per_image, w, axis_name)


def cw_cel_fine_grained(logits, labels, *, no_positive: str = "ignore",
                        mask=None, axis_name=None) -> Array:
  """Fine-grained CW-CEL (eqs. 9-11): per-class weights from batch counts.

      L = sum_c [ alpha_N^c sum_{y_c=1} -ln f(x_c)
                  + alpha_P^c sum_{y_c=0} -ln(1 - f(x_c)) ],
      alpha_P^c = P_c / (N_c + P_c),   alpha_N^c = N_c / (N_c + P_c).

  A class with no positive in the global batch (Hernia in ~97% of batches of
  16) has alpha_P^c = 0, so its negatives get zero weight:

  * `no_positive='ignore'` (default, the equation as written): the class
    contributes nothing to this batch's loss or gradient.
  * `no_positive='batch_alpha'`: such a class falls back to the batch-level
    weights of CW-CEL (eqs. 7-8), so its negatives still learn.

  A class with no negative is symmetric (alpha_N^c = 0; its positives get
  zero weight) and follows the same rule.
  """
  if no_positive not in ("ignore", "batch_alpha"):
    raise ValueError(f"no_positive must be 'ignore' or 'batch_alpha', got "
                     f"{no_positive!r}")
  pos, neg = _log_terms(logits, labels)
  w = _image_weights(labels, mask)
  p_c, n_c = _counts(labels, w, axis_name, per_class=True)
  alpha_p, alpha_n = p_c / (p_c + n_c), n_c / (p_c + n_c)
  if no_positive == "batch_alpha":
    p, n = jnp.sum(p_c), jnp.sum(n_c)
    degenerate = (p_c == 0) | (n_c == 0)
    alpha_p = jnp.where(degenerate, p / (p + n), alpha_p)
    alpha_n = jnp.where(degenerate, n / (p + n), alpha_n)
  per_image = jnp.sum(alpha_n * pos + alpha_p * neg, axis=-1)
  return _batch_mean(per_image, w, axis_name)


# --------------------------------------------------------------------------
# Beyond the paper: modern imbalance baselines
# --------------------------------------------------------------------------

def _sigmoid_pow(z, gamma):
  """sigmoid(z) ** gamma as exp(gamma * log_sigmoid(z)): exact, and its
  gradient stays finite where sigmoid(z) underflows (z = -100)."""
  if gamma == 0:
    return jnp.ones_like(z)
  return jnp.exp(gamma * jax.nn.log_sigmoid(z))


def focal(logits, labels, *, gamma: float = 2.0, alpha: float | None = 0.25,
          mask=None, axis_name=None) -> Array:
  """Focal loss, Lin et al. 2017 ("Focal Loss for Dense Object Detection").

      FL = -alpha_t (1 - p_t)^gamma ln(p_t),  p_t = p if y = 1 else 1 - p,

  with alpha_t = alpha for positives and 1 - alpha for negatives
  (`alpha=None`: no alpha weighting). Summed over classes, mean over images.
  """
  z = at_least_float32(logits)
  y = labels.astype(z.dtype)
  pos = -y * _sigmoid_pow(-z, gamma) * jax.nn.log_sigmoid(z)
  neg = -(1 - y) * _sigmoid_pow(z, gamma) * jax.nn.log_sigmoid(-z)
  if alpha is not None:
    pos, neg = alpha * pos, (1 - alpha) * neg
  per_image = jnp.sum(pos + neg, axis=-1)
  return _batch_mean(per_image, _image_weights(labels, mask), axis_name)


def asymmetric(logits, labels, *, gamma_pos: float = 0.0,
               gamma_neg: float = 4.0, clip: float = 0.05, mask=None,
               axis_name=None) -> Array:
  """Asymmetric loss (ASL), Ridnik et al. 2021 ("Asymmetric Loss For
  Multi-Label Classification"), with its paper's defaults.

      L+ = (1 - p)^gamma_pos ln(p)
      L- = p_m^gamma_neg ln(1 - p_m),   p_m = max(p - clip, 0)
      L  = -sum_c [ y L+ + (1 - y) L- ]

  The probability shift `clip` discards easy negatives (p < clip) entirely.
  """
  z = at_least_float32(logits)
  y = labels.astype(z.dtype)
  pos = -y * _sigmoid_pow(-z, gamma_pos) * jax.nn.log_sigmoid(z)
  if clip > 0:
    p_m = jnp.maximum(jax.nn.sigmoid(z) - clip, 0.0)
    # 1 - p_m = min(sigmoid(-z) + clip, 1) >= clip: its log is finite.
    log_one_minus = jnp.log(jnp.minimum(jax.nn.sigmoid(-z) + clip, 1.0))
    # p_m ** gamma with a zero-safe gradient (the double-where idiom).
    positive = p_m > 0
    safe = jnp.where(positive, p_m, 1.0)
    weight = jnp.where(positive, safe ** gamma_neg, 0.0) if gamma_neg else 1.0
  else:
    log_one_minus = jax.nn.log_sigmoid(-z)
    weight = _sigmoid_pow(z, gamma_neg)
  neg = -(1 - y) * weight * log_one_minus
  per_image = jnp.sum(pos + neg, axis=-1)
  return _batch_mean(per_image, _image_weights(labels, mask), axis_name)


# --------------------------------------------------------------------------
# By name, with the auxiliary task
# --------------------------------------------------------------------------

LOSSES: dict[str, LossFn] = {
    "cross_entropy": cross_entropy,
    "mse": mse,
    "w_cel": w_cel,
    "w_cel_faithful": functools.partial(w_cel, safe=False),
    "cw_cel": cw_cel,
    "cw_cel_fine_grained": cw_cel_fine_grained,
    "focal": focal,
    "asymmetric": asymmetric,
}


def select_outputs(logits, labels, aux_task: bool):
  """The outputs a loss sees: all 15 with the auxiliary "normal" task, else
  the 14 diseases. Labels may carry the normal column either way."""
  n = label_names.NUM_OUTPUTS if aux_task else label_names.NUM_DISEASES
  if logits.shape[-1] < n or labels.shape[-1] < n:
    raise ValueError(f"aux_task={aux_task} needs {n} outputs and label "
                     f"columns; got logits {logits.shape}, labels "
                     f"{labels.shape}")
  return logits[..., :n], labels[..., :n]


def get_loss(name: str, aux_task: bool = True, **kwargs) -> LossFn:
  """The loss `name` (a key of LOSSES) applied to the right outputs.

  Returns `fn(logits, labels, *, mask=None, axis_name=None) -> scalar`.
  """
  if name not in LOSSES:
    raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}")
  base = functools.partial(LOSSES[name], **kwargs) if kwargs else LOSSES[name]

  def loss_fn(logits, labels, *, mask=None, axis_name=None):
    logits, labels = select_outputs(logits, labels, aux_task)
    return base(logits, labels, mask=mask, axis_name=axis_name)

  return loss_fn
