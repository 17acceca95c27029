"""What every backbone shares: the interface's fields (`Backbone`), the
classifier head and its class maps, input normalisation, the layers'
BatchNorm settings (`Layer`), the Inception families' blocks
(`InceptionBlock`, and the branches of those V3, V4 and Inception-ResNet-V2
share: `inception_a` ... `inception_c`), grid geometry for CAM, and dtype
helpers.

The model interface (every family in `cxr_jax.models` follows it):

* `Model(num_classes=..., dtype=..., bn_axis_name=..., bn_momentum=...,
  head_pooling='avg'|'lse', lse_r=..., dropout_rate=..., input_norm=...,
  **family options)`, a Flax linen module.
* `model.apply(variables, x, train=False)` takes NHWC inputs in [-1, 1] with
  3 channels (what `cxr_jax.data.pipeline.to_model_input` makes) and returns
  float32 logits. The model itself turns [-1, 1] into what its weights expect
  (`input_norm`), so nothing outside `models/` knows which backbone runs.
* `model.apply(..., return_features=True)` returns `(logits, out)`, where
  `out["class_maps"]` is `[B, h, w, num_classes]`: the head applied to every
  cell of the last spatial map (CAM, Zhou et al. 2016; big_vision's
  `logits_2d`), `out["feature_map"]` is that map and `out["pooled"]` the
  pooled vector (average pooling only). Families add their own named maps.
* `model.feature_grid(size)` gives `(cells, offset, stride)`: the last map's
  side for `size`-px inputs and where each cell's receptive field is centred
  (`offset + stride * i`, pixel k spans [k, k+1)). CAM upsampling uses it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar, Mapping, Sequence, TypeVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
T = TypeVar("T")

HEAD_POOLINGS = ("avg", "lse", "lse_features")
LSE_R = 10.0


def at_least_float32(x):
  """bfloat16 -> float32; float64 (the exactness tests) stays float64."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def lse_pool(x, r: float):
  """Log-mean-exp over the spatial axes: between the mean (r -> 0) and the
  max (r -> inf)."""
  x = at_least_float32(x)
  return (jax.nn.logsumexp(r * x, axis=(1, 2)) -
          jnp.log(x.shape[1] * x.shape[2])) / r


def classifier_head(x, *, num_classes: int, pooling: str = "avg",
                    lse_r: float = LSE_R, dropout_rate: float = 0.0,
                    train: bool = False, class_maps: bool = False):
  """The 15-output head on a spatial map `x` [B, h, w, K]: (logits, out).

  Call it inside a module's compact `__call__`: it creates the module's
  `head` Dense (parameters `head/kernel`, `head/bias`, the names every
  converter and `dont_load` use).

  * 'avg': global average pooling, then the head (Keras, the paper). The
    head is linear, so the mean of the class maps over cells equals the
    logits: the CAM of a class is exactly what its logit averages.
  * 'lse': the head scores every cell and log-sum-exp pooling (r = `lse_r`)
    turns each class map into a logit. Max-like pooling rewards one strong
    cell rather than a broad plateau, so the maps are sharper.
  * 'lse_features': log-sum-exp pooling of the features, then the head
    (Wang et al. 2017's transition-layer network, Table 2's CEL(tran.)).

  `out` holds 'class_maps' (when `class_maps` or 'lse'), 'pooled' (not 'lse')
  and 'feature_map' (`x`). Logits and class maps leave in at least float32.
  """
  if pooling not in HEAD_POOLINGS:
    raise ValueError(f"head_pooling must be one of {HEAD_POOLINGS}, got "
                     f"{pooling!r}")
  # The head, its pooling and the class maps compute in at least float32
  # (float64 stays), whatever the backbone's dtype. bfloat16's 8 bits would
  # round a cell's score by up to 0.03 at |s| >= 4, so LSE pooling's
  # weights exp(r s) (r = 10) would jump by 35% between neighbouring values,
  # and the maps that CAM boxes are cut from would carry that rounding. The
  # head is a few thousand MACs a cell: float32 costs nothing measurable.
  out = {"feature_map": x}
  x = at_least_float32(x)
  head = nn.Dense(num_classes, dtype=x.dtype, name="head")
  dropout = nn.Dropout(dropout_rate, deterministic=not train)
  if pooling == "lse":
    maps = head(dropout(x))
    out["class_maps"] = maps
    logits = lse_pool(maps, lse_r)
  else:
    pooled = (jnp.mean(x, axis=(1, 2)) if pooling == "avg"
              else lse_pool(x, lse_r))
    out["pooled"] = pooled
    logits = head(dropout(pooled))
    if class_maps:
      out["class_maps"] = head(x)
  return logits, out


def check_input(x, min_size: int, family: str) -> None:
  """NHWC with 3 channels and at least `min_size` pixels a side, or one
  ValueError naming the family and the shape."""
  if x.ndim != 4 or x.shape[-1] != 3:
    raise ValueError(f"expected NHWC inputs with 3 channels, got {x.shape}")
  if min(x.shape[1:3]) < min_size:
    raise ValueError(f"{family} needs inputs of at least {min_size}x"
                     f"{min_size}, got {tuple(x.shape[1:3])}")


def lookup(table: Mapping[Any, T], key: Any, what: str = "variant") -> T:
  """`table[key]`, or a ValueError naming `what` and the choices: how a
  family resolves its `variant` (the upstream it follows) or its `depth`."""
  if key not in table:
    raise ValueError(f"{what} must be one of {sorted(table)}, got {key!r}")
  return table[key]


def _varying_axes(a) -> frozenset:
  """The mesh axes along which `a` varies inside `jax.shard_map` (none
  outside it, and under pmap)."""
  t = jax.typeof(a)
  manual = getattr(t, "manual_axis_type", None)  # jax >= 0.10
  if manual is not None:
    return frozenset(manual.varying)
  return frozenset(getattr(t, "vma", ()) or ())


def _cotangent_like(ct, primal):
  """`ct` summed over the axes it varies along and `primal` does not: what
  autodiff does for a replicated parameter used by per-device data (the
  transpose of its implicit broadcast is a psum), so a hand-written gradient
  has the type, and the value, of the derived one."""
  extra = tuple(sorted(_varying_axes(ct) - _varying_axes(primal)))
  return jax.lax.psum(ct, extra) if extra else ct


def _batch_statistics(x, axis_name):
  """Mean and two-pass variance over all axes but the last, in at least
  float32, averaged over `axis_name`: flax's `_compute_stats`."""
  xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  axes = tuple(range(x.ndim - 1))
  mean = xf.mean(axes)
  if axis_name is not None:
    mean = jax.lax.pmean(mean, axis_name)
  var = jax.lax.square(xf - mean).mean(axes)
  if axis_name is not None:
    var = jax.lax.pmean(var, axis_name)
  return mean, var


def _normalize(x, mean, var, scale, bias, epsilon, dtype):
  """flax's `_normalize`, operation for operation."""
  mul = jax.lax.rsqrt(var + epsilon)
  if scale is not None:
    mul = mul * scale
  return jnp.asarray((x - mean) * mul + bias, dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _train_batch_norm(x, scale, bias, epsilon, axis_name, dtype):
  mean, var = _batch_statistics(x, axis_name)
  return _normalize(x, mean, var, scale, bias, epsilon, dtype), mean, var


def _train_batch_norm_fwd(x, scale, bias, epsilon, axis_name, dtype):
  out = _train_batch_norm(x, scale, bias, epsilon, axis_name, dtype)
  _, mean, var = out
  return out, (x, mean, var, scale, bias)


def _train_batch_norm_bwd(epsilon, axis_name, dtype, residuals, cotangents):
  """The textbook gradient of batch normalization. Only `y`'s cotangent
  counts: the statistics leave as running averages, never into the loss."""
  x, mean, var, scale, bias = residuals
  g = cotangents[0].astype(mean.dtype)
  axes = tuple(range(x.ndim - 1))
  inv = jax.lax.rsqrt(var + epsilon)
  x_hat = (x.astype(mean.dtype) - mean) * inv
  sum_g, sum_g_x_hat = g.sum(axes), (g * x_hat).sum(axes)
  count = np.prod([x.shape[a] for a in axes])
  mean_g, mean_g_x_hat = sum_g / count, sum_g_x_hat / count
  if axis_name is not None:  # every device holds an equal share
    mean_g, mean_g_x_hat = jax.lax.pmean((mean_g, mean_g_x_hat), axis_name)
  mul = inv if scale is None else inv * scale
  dx = (mul * (g - mean_g - x_hat * mean_g_x_hat)).astype(x.dtype)
  dscale = (None if scale is None else
            _cotangent_like(sum_g_x_hat.astype(scale.dtype), scale))
  return dx, dscale, _cotangent_like(sum_g.astype(bias.dtype), bias)


_train_batch_norm.defvjp(_train_batch_norm_fwd, _train_batch_norm_bwd)


class BatchNorm(nn.Module):
  """`flax.linen.BatchNorm` over NHWC as every backbone runs it: the same
  variables (`scale`, `bias`; `mean`, `var` in 'batch_stats'), forward and
  running averages, with the two-pass variance (E[x^2] - E[x]^2 cancels
  badly, and the rounding compounds through a deep network) and batch
  statistics averaged over `axis_name` in training.

  Why not flax's module: in training, autodiff through its statistics gives
  a gradient that XLA computes with more full-size passes than the textbook
  formula (two reductions, then one elementwise pass), a large share of a
  training step's memory traffic (benchmarks/RESULTS.md). The gradient here
  is that formula, equal to flax's to rounding (tests/test_model.py).
  """

  use_running_average: bool
  momentum: float
  epsilon: float
  use_scale: bool = True
  dtype: Dtype | None = None
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x):
    features = (x.shape[-1],)
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, features,
                            jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, features,
                           jnp.float32)
    scale = (self.param("scale", nn.initializers.ones, features, jnp.float32)
             if self.use_scale else None)
    bias = self.param("bias", nn.initializers.zeros, features, jnp.float32)
    dtype = self.dtype or jnp.result_type(x, jnp.float32)
    if self.use_running_average:
      return _normalize(x, ra_mean.value, ra_var.value, scale, bias,
                        self.epsilon, dtype)
    # As flax: `init` runs outside any mapped axis.
    axis_name = None if self.is_initializing() else self.axis_name
    y, mean, var = _train_batch_norm(x, scale, bias, self.epsilon, axis_name,
                                     dtype)
    if not self.is_initializing():
      ra_mean.value = (self.momentum * ra_mean.value
                       + (1 - self.momentum) * mean)
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return y


def batch_norm(train: bool, *, epsilon: float, momentum: float,
               axis_name: str | None, dtype: Dtype, name: str,
               use_scale: bool = True) -> BatchNorm:
  """`BatchNorm` as every backbone builds it: batch statistics averaged over
  `axis_name` in training only."""
  return BatchNorm(use_running_average=not train, momentum=momentum,
                   epsilon=epsilon, use_scale=use_scale, dtype=dtype,
                   axis_name=axis_name if train else None, name=name)


class ConvBN(nn.Module):
  """Conv -> BatchNorm -> ReLU, the unit of the Inception families (Keras'
  `conv2d_bn`, torchvision's and timm's BasicConv2d, the Caffe
  BN-Inception's triples). Parameters `conv/...` and `bn/...`, the names
  every converter maps to."""

  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: Any = "SAME"
  dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None
  bn_momentum: float = 0.99
  bn_epsilon: float = 1e-3
  bn_scale: bool = False  # Keras' Inceptions have no gamma; timm's have one
  kernel_init: Any = nn.initializers.lecun_normal()
  use_bias: bool = False  # only the Caffe BN-Inception's convs have one

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(self.features, self.kernel_size, strides=self.strides,
                padding=self.padding, use_bias=self.use_bias, dtype=self.dtype,
                kernel_init=self.kernel_init, name="conv")(x)
    x = batch_norm(train, epsilon=self.bn_epsilon, momentum=self.bn_momentum,
                   axis_name=self.bn_axis_name, dtype=self.dtype,
                   use_scale=self.bn_scale, name="bn")(x)
    return nn.relu(x)


class Layer(nn.Module):
  """What every sub-module of a backbone carries, as its model resolved it:
  the compute dtype and BatchNorm's sync axis and momentum."""

  dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None
  bn_momentum: float = 0.99

  def settings(self) -> dict[str, Any]:
    """These fields, for the sub-modules this one builds."""
    return dict(dtype=self.dtype, bn_axis_name=self.bn_axis_name,
                bn_momentum=self.bn_momentum)

  def batch_norm(self, train: bool, epsilon: float, name: str,
                 use_scale: bool = True) -> BatchNorm:
    """`batch_norm` with this layer's settings."""
    return batch_norm(train, epsilon=epsilon, momentum=self.bn_momentum,
                      axis_name=self.bn_axis_name, dtype=self.dtype,
                      use_scale=use_scale, name=name)


@dataclasses.dataclass(frozen=True)
class Unit:
  """One conv-BN-ReLU of an Inception branch (`InceptionBlock.conv`'s
  arguments)."""

  features: int
  kernel: tuple[int, int]
  name: str
  strides: tuple[int, int] = (1, 1)
  padding: str = "SAME"


def max_pool(x, window: Sequence[int], strides: Sequence[int],
             padding: str | Sequence[tuple[int, int]] = "VALID"):
  """Max pooling over NHWC `x`, as `flax.linen.max_pool` computes it (padding
  counts as -inf), with the same gradient: each window's first maximum, in
  row-major order, takes the window's whole gradient.

  Why not `nn.max_pool`: its gradient is XLA's select-and-scatter, which the
  CPU backend expands into an iota of the input's shape, a variadic
  reduce-window over (value, index) pairs and a scatter, a large share of a
  CPU training step (benchmarks/RESULTS.md). Here the forward is the
  elementwise maximum of the window's strided slices, and the gradient is
  one compare-and-select per window position, each placed back by an
  interior-padded `lax.pad`: elementwise work that XLA fuses on any backend.
  """
  window, strides = tuple(window), tuple(strides)
  if isinstance(padding, str):
    pads = jax.lax.padtype_to_pads(x.shape[1:3], window, strides, padding)
  else:
    pads = padding
  return _max_pool(x, window, strides, tuple(tuple(p) for p in pads))


def _window_slices(xp, window, strides, out_hw):
  """The window positions' strided views of the padded input, row-major."""
  (kh, kw), (sh, sw), (oh, ow) = window, strides, out_hw
  b, _, _, c = xp.shape
  for i in range(kh):
    for j in range(kw):
      end = (b, i + (oh - 1) * sh + 1, j + (ow - 1) * sw + 1, c)
      yield (i, j), jax.lax.slice(xp, (0, i, j, 0), end, (1, sh, sw, 1))


def _pool_forward(x, window, strides, pads):
  low = jnp.array(-jnp.inf, x.dtype)
  xp = jax.lax.pad(x, low, ((0, 0, 0), (*pads[0], 0), (*pads[1], 0),
                            (0, 0, 0)))
  out_hw = tuple((xp.shape[1 + a] - window[a]) // strides[a] + 1
                 for a in range(2))
  out = functools.reduce(jnp.maximum, (
      s for _, s in _window_slices(xp, window, strides, out_hw)))
  return out, xp


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x, window, strides, pads):
  return _pool_forward(x, window, strides, pads)[0]


def _max_pool_fwd(x, window, strides, pads):
  out, xp = _pool_forward(x, window, strides, pads)
  return out, (xp, out)


def _max_pool_bwd(window, strides, pads, residuals, g):
  xp, out = residuals
  (sh, sw), (oh, ow) = strides, out.shape[1:3]
  hp, wp = xp.shape[1:3]
  taken = jnp.zeros(out.shape, bool)
  zero = jnp.array(0, g.dtype)
  parts = []
  for (i, j), s in _window_slices(xp, window, strides, (oh, ow)):
    first = (s == out) & ~taken
    taken = taken | first
    # Back to the padded input's grid: offset (i, j), stride-1 zeros between.
    parts.append(jax.lax.pad(
        jnp.where(first, g, zero), zero,
        ((0, 0, 0), (i, hp - i - (oh - 1) * sh - 1, sh - 1),
         (j, wp - j - (ow - 1) * sw - 1, sw - 1), (0, 0, 0))))
  # Summed in the order of the windows (the last offset is the earliest
  # window over a cell), as select-and-scatter adds them: the same float
  # rounding where windows overlap. The short demo's CAM figures move with
  # such last-bit differences (benchmarks/RESULTS.md).
  grad = jnp.zeros(xp.shape, g.dtype)
  for part in reversed(parts):
    grad = grad + part
  (top, _), (left, _) = pads
  h, w = hp - sum(pads[0]), wp - sum(pads[1])
  return (grad[:, top:top + h, left:left + w, :],)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool_3x3(x, stride: int = 2):
  """The Inception stems' and reductions' 3x3 'VALID' max pool."""
  return max_pool(x, (3, 3), (stride, stride), "VALID")


StemRow = tuple[str, int, tuple[int, int], tuple[int, int], str]


def slim_stem(names: Sequence[str]) -> tuple[StemRow, ...]:
  """TF-slim's Inception V3 stem, which Inception-ResNet-V2 reuses and
  Inception V4 begins with: (name, features, kernel, strides, padding) of
  its first `len(names)` convolutions, named `names`. In V3 and
  Inception-ResNet-V2 a 3x3/2 max pool follows the third and the fifth."""
  convs = ((32, (3, 3), (2, 2), "VALID"), (32, (3, 3), (1, 1), "VALID"),
           (64, (3, 3), (1, 1), "SAME"), (80, (1, 1), (1, 1), "VALID"),
           (192, (3, 3), (1, 1), "VALID"))
  return tuple((name, *conv) for name, conv in zip(names, convs[:len(names)],
                                                    strict=True))


# A kernel: a 1x3 and a 3x1 convolution side by side, which the 8x8 blocks
# use to widen their filter banks.
SPLIT = "1x3|3x1"


@dataclasses.dataclass(frozen=True)
class Naming:
  """How a family names the units of a block's branches: each branch's label
  and the number of a branch's first unit. A branch of one unit is named by
  its label alone, a longer one's units `<label>_<first + i>`; a `SPLIT`
  adds `a` (1x3) and `b` (3x1). The default is TF-slim's and timm's
  (`branch1_0`); torchvision's labels say what a branch computes and count
  from 1 (`branch5x5_1`)."""

  labels: tuple[str, ...] = ("branch0", "branch1", "branch2", "branch_pool")
  first: int = 0

  def branch(self, i: int, widths: Sequence[int], kernels: Sequence[Any],
             last_stride: int | None = None) -> list[Any]:
    """Branch `i`: a unit per width and kernel. With `last_stride` the last
    unit is a reduction's: 'VALID', with that stride."""
    label, steps = self.labels[i], []
    for j, (features, kernel) in enumerate(zip(widths, kernels, strict=True)):
      name = label if len(widths) == 1 else f"{label}_{self.first + j}"
      if kernel == SPLIT:
        steps.append(([Unit(features, (1, 3), name + "a")],
                      [Unit(features, (3, 1), name + "b")]))
      elif last_stride is not None and j == len(widths) - 1:
        steps.append(Unit(features, kernel, name, (last_stride,) * 2,
                          "VALID"))
      else:
        steps.append(Unit(features, kernel, name))
    return steps


TIMM = Naming()


# The blocks Inception V3 and V4 and Inception-ResNet-V2 share, each family
# with its own filter counts (a width per convolution, branch by branch)
# and names. Figures are those of Szegedy et al. 2016, "Inception-v4,
# Inception-ResNet and the Impact of Residual Connections on Learning".
def inception_a(avg_pool, b0: int, b1: Sequence[int], b2: Sequence[int],
                pool: int, kernel: tuple[int, int] = (3, 3),
                names: Naming = TIMM) -> tuple[list, ...]:
  """35x35 block: 1x1 | 1x1, `kernel` | 1x1, 3x3, 3x3 | `avg_pool`, 1x1.
  Inception V4's (Figure 4) `kernel` is 3x3; V3's Mixed_5b-d and
  Inception-ResNet-V2's mixed_5b have a 5x5 there."""
  return (names.branch(0, [b0], [(1, 1)]),
          names.branch(1, b1, [(1, 1), kernel]),
          names.branch(2, b2, [(1, 1), (3, 3), (3, 3)]),
          [avg_pool, *names.branch(3, [pool], [(1, 1)])])


def reduction_a(k: int, l: int, m: int, n: int,
                names: Naming = TIMM) -> tuple[list, ...]:
  """Reduction-A (35 -> 17; Figure 7 and Table 1's k, l, m, n): 3x3/2 |
  1x1, 3x3, 3x3/2 | max pool. Inception V3's Mixed_6a is k=64, l=m=96,
  n=384."""
  return (names.branch(0, [n], [(3, 3)], last_stride=2),
          names.branch(1, [k, l, m], [(1, 1), (3, 3), (3, 3)], last_stride=2),
          [max_pool_3x3])


def inception_b(avg_pool, b0: int, b1: Sequence[int], b2: Sequence[int],
                pool: int, names: Naming = TIMM) -> tuple[list, ...]:
  """17x17 block, its 7x7s factorised (Figure 5; V3's Mixed_6b-e): 1x1 |
  1x1, 1x7, 7x1 | 1x1, 7x1, 1x7, 7x1, 1x7 | `avg_pool`, 1x1."""
  return (names.branch(0, [b0], [(1, 1)]),
          names.branch(1, b1, [(1, 1), (1, 7), (7, 1)]),
          names.branch(2, b2, [(1, 1), (7, 1), (1, 7), (7, 1), (1, 7)]),
          [avg_pool, *names.branch(3, [pool], [(1, 1)])])


def reduction_b(b0: Sequence[int], b1: Sequence[int], names: Naming = TIMM,
                stride: int = 2) -> tuple[list, ...]:
  """Reduction-B (17 -> 8; Figure 8, V3's Mixed_7a): 1x1, 3x3/s | 1x1, 1x7,
  7x1, 3x3/s | 3x3/s max pool, the 3x3s 'VALID'."""
  return (names.branch(0, b0, [(1, 1), (3, 3)], last_stride=stride),
          names.branch(1, b1, [(1, 1), (1, 7), (7, 1), (3, 3)],
                       last_stride=stride),
          [functools.partial(max_pool_3x3, stride=stride)])


def inception_c(avg_pool, b0: int, b1: Sequence[int], b2: Sequence[int],
                pool: int, middle: Sequence[tuple[int, int]] = ((3, 3),),
                names: Naming = TIMM) -> tuple[list, ...]:
  """8x8 block with expanded filter banks: 1x1 | 1x1, SPLIT | 1x1,
  `middle`, SPLIT | `avg_pool`, 1x1. V3's Mixed_7b/c have one 3x3 in
  the middle, Inception V4's (Figure 6) a 3x1 and a 1x3."""
  return (names.branch(0, [b0], [(1, 1)]),
          names.branch(1, b1, [(1, 1), SPLIT]),
          names.branch(2, b2, [(1, 1), *middle, SPLIT]),
          [avg_pool, *names.branch(3, [pool], [(1, 1)])])


class InceptionBlock(Layer):
  """A block of an Inception family (V3, V4, Inception-ResNet-V2): parallel
  branches of conv-BN-ReLU units and pools, concatenated.

  A family sets its BatchNorm's `bn_epsilon` and `bn_scale` (class
  attributes: they are what its weights were trained with, not options). A
  block lists its branches in `branches()`, each a list of steps run in
  order: a `Unit`, a function of the map (a pool), or a tuple of branches
  run side by side and concatenated (the 1x3 | 3x1 split of the 8x8
  blocks).
  """

  bn_epsilon: ClassVar[float]
  bn_scale: ClassVar[bool]

  @classmethod
  def conv_bn(cls, features: int, kernel: tuple[int, int],
              strides: tuple[int, int] = (1, 1), padding: str = "SAME",
              **kwargs) -> ConvBN:
    """The family's conv-BN-ReLU (a model's stem builds them with this)."""
    return ConvBN(features, kernel, strides, padding, bn_epsilon=cls.bn_epsilon,
                  bn_scale=cls.bn_scale, **kwargs)

  @classmethod
  def stem(cls, x, train: bool, rows: Sequence[StemRow],
           pool_after: Sequence[str] = (), **options):
    """A model's stem: the family's conv-BN-ReLU for each of `rows` (see
    `slim_stem`) in order, a 3x3/2 max pool after those named in
    `pool_after`. Call inside the model's compact `__call__`."""
    for name, features, kernel, strides, padding in rows:
      x = cls.conv_bn(features, kernel, strides, padding, name=name,
                      **options)(x, train)
      if name in pool_after:
        x = max_pool_3x3(x)
    return x

  def conv(self, unit: Unit, **options) -> ConvBN:
    """`unit` with this block's settings."""
    return self.conv_bn(unit.features, unit.kernel, unit.strides,
                        unit.padding, name=unit.name, **options,
                        **self.settings())

  def avg_pool_3x3(self, x):
    """The pool branches' 3x3/1 average, which leaves the padding out of the
    mean (TensorFlow's, timm's `count_include_pad=False`)."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding="SAME",
                       count_include_pad=False)

  def run(self, x, train: bool, steps: Sequence[Any]):
    """One branch: its steps in order."""
    for step in steps:
      if isinstance(step, Unit):
        x = self.conv(step)(x, train)
      elif isinstance(step, tuple):
        x = self.side_by_side(x, train, step)
      else:
        x = step(x)
    return x

  def side_by_side(self, x, train: bool, branches: Sequence[Sequence[Any]]):
    """`branches` each applied to `x`, concatenated in order."""
    return jnp.concatenate([self.run(x, train, b) for b in branches], axis=-1)

  @nn.compact
  def __call__(self, x, train: bool):
    return self.side_by_side(x, train, self.branches())


def repeat(block: nn.Module, x, train: bool, times: int,
           unroll: bool = False):
  """`block` applied `times` times in sequence, each time with variables of
  its own, stacked on a leading axis of length `times` under `block`'s name
  (`nn.scan`). XLA then compiles one body, not `times` copies: a deep
  network's training step compiles faster, though on CPU it steps slower
  (benchmarks/RESULTS.md). A family names its
  stacked groups' blocks in `REPEATED` (group -> the upstream's names of its
  blocks, in order), from which converters stack the upstream's arrays.

  `unroll` traces every block (same variables, same numbers): XLA's cost
  analysis counts a loop's body once, so FLOP and byte counts need it."""
  def body(module, carry, _):
    return module(carry, train), None
  scanned = nn.scan(body, variable_axes={"params": 0, "batch_stats": 0},
                    split_rngs={"params": True}, length=times,
                    unroll=times if unroll else 1)
  return scanned(block, x, None)[0]


class Backbone(nn.Module):
  """The model interface's fields (see above). A family adds its options
  and declares a field again where its default differs. `input_norm` and
  `bn_momentum` left None take those of the model's `upstream()`."""

  num_classes: int = 1000
  dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None
  bn_momentum: float | None = None
  head_pooling: str = "avg"
  lse_r: float = LSE_R
  dropout_rate: float = 0.0
  input_norm: str | None = None

  # A family that follows more than one upstream sets this to its table of
  # them (rows with `input_norm` and `bn_momentum`), keyed by its `variant`
  # field. A class attribute, not an option.
  VARIANTS = None

  def upstream(self) -> Any:
    """This model's row of VARIANTS; None for a family with one upstream."""
    if self.VARIANTS is None:
      return None
    return lookup(self.VARIANTS, self.variant)

  def resolved(self, field: str) -> Any:
    """`field`'s value, or the upstream's where the field is None."""
    value, upstream = getattr(self, field), self.upstream()
    if value is None and upstream is not None:
      return getattr(upstream, field)
    return value

  def layer_settings(self, **family) -> dict[str, Any]:
    """What the model's `Layer`s get (and `family`'s own options)."""
    return dict(dtype=self.dtype, bn_axis_name=self.bn_axis_name,
                bn_momentum=self.resolved("bn_momentum"), **family)

  def model_input(self, x, min_size: int, family: str):
    """`x` checked (see `check_input`), in what the weights expect
    (`input_norm`) and the compute dtype."""
    check_input(x, min_size, family)
    return normalize_input(x, self.resolved("input_norm")).astype(self.dtype)

  def outputs(self, x, named: dict, train: bool, return_features: bool,
              pooling: str | None = None):
    """The interface's return from the last map `x`: logits, or (logits,
    {**named maps, **the head's out}). Call inside compact."""
    logits, out = classifier_head(
        x, num_classes=self.num_classes, pooling=pooling or self.head_pooling,
        lse_r=self.lse_r, dropout_rate=self.dropout_rate, train=train,
        class_maps=return_features)
    return (logits, {**named, **out}) if return_features else logits


class InceptionBackbone(Backbone):
  """A model of the Inception families (V3, V4, Inception-ResNet-V2): each
  begins with TF-slim's stem (`InceptionBlock.stem`), and the ImageNet
  weights of all of them (Keras', torchvision's, timm's) take [-1, 1] as
  is."""

  input_norm: str = "inception"


# --------------------------------------------------------------------------
# Input normalisation: the model gets [-1, 1]; its weights may expect other.
# --------------------------------------------------------------------------

# name: (channel order, mean, std) applied to pixel values v in [0, 255]:
# (v[order] - mean) / std. 'inception' is the identity on [-1, 1].
INPUT_NORMS: dict[str, tuple[str, tuple[float, ...], tuple[float, ...]]] = {
    # Inception family (Keras 'tf' mode, timm's Inception V4): [-1, 1].
    "inception": ("RGB", (127.5,) * 3, (127.5,) * 3),
    # torchvision and Keras' 'torch' mode (DenseNet): ImageNet mean and std.
    "torch": ("RGB", (0.485 * 255, 0.456 * 255, 0.406 * 255),
              (0.229 * 255, 0.224 * 255, 0.225 * 255)),
    # Keras' 'caffe' mode (ResNet v1, VGG): BGR, mean subtracted, no scaling.
    "caffe": ("BGR", (103.939, 116.779, 123.68), (1.0, 1.0, 1.0)),
    # The Caffe BN-Inception of `pretrainedmodels`: BGR, 0..255, rounded mean.
    "caffe_bn_inception": ("BGR", (104.0, 117.0, 128.0), (1.0, 1.0, 1.0)),
}


def normalize_input(x, input_norm: str):
  """[-1, 1] RGB -> what weights trained with `input_norm` expect."""
  if input_norm not in INPUT_NORMS:
    raise ValueError(f"input_norm must be one of {sorted(INPUT_NORMS)}, got "
                     f"{input_norm!r}")
  if input_norm == "inception":
    return x
  order, mean, std = INPUT_NORMS[input_norm]
  if order == "BGR":
    x = x[..., ::-1]
  mean = jnp.asarray(mean, x.dtype)
  std = jnp.asarray(std, x.dtype)
  return ((x + 1.0) * 127.5 - mean) / std


# --------------------------------------------------------------------------
# Grid geometry for CAM
# --------------------------------------------------------------------------

def grid_geometry(size: int, layers: Sequence[tuple[int, int, Any]]
                  ) -> tuple[int, float, float]:
  """(cells, offset, stride) after `layers`, each (kernel, stride, padding)
  with padding 'VALID', 'SAME' (TensorFlow's: the extra pixel goes after) or
  an int (symmetric, as PyTorch's `padding=p`).

  Output cell i of one layer is centred at input coordinate
  i * s - pad_before + (k - 1) / 2; composing these gives the centre of a
  final cell's receptive field in pixels. Layers that keep the grid (stride
  1, 'SAME') may be left out.
  """
  cells, offset, stride = size, 0.5, 1.0
  for kernel, step, padding in layers:
    if padding == "VALID":
      before, out = 0, (cells - kernel) // step + 1
    elif padding == "SAME":
      out = -(-cells // step)
      before = max((out - 1) * step + kernel - cells, 0) // 2
    else:
      before, out = int(padding), (cells + 2 * int(padding) - kernel) // step + 1
    offset += stride * ((kernel - 1) / 2 - before)
    stride *= step
    cells = out
  return cells, offset, stride


def inception_grid(size: int, last_stride: int = 2
                   ) -> tuple[int, float, float]:
  """(cells, offset, stride) of the last map of Inception V3, V4 or
  Inception-ResNet-V2 for `size`-px inputs. All three move and shrink their
  grid alike, with 3x3 'VALID' layers of strides 2, 1, 2, 1, 2 on the way to
  35x35 (TF-slim's stem; V4 ends it in Mixed_3a-5a), then the two
  reductions; `last_stride` is the second's (V3's output_stride 16 sets 1).
  Layers that keep the grid (stride 1 and 'SAME', or 1x1) are left out."""
  strides = (2, 1, 2, 1, 2, 2, last_stride)
  return grid_geometry(size, [(3, s, "VALID") for s in strides])


def count_parameters(variables) -> int:
  """All numbers in `variables` (params and BatchNorm statistics), the way
  Keras' `count_params()` counts them."""
  return sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(variables))
