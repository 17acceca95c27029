"""BN-Inception / Inception V2 (Ioffe & Szegedy 2015, "Batch Normalization:
Accelerating Deep Network Training by Reducing Internal Covariate Shift",
Figure 5's network) in Flax linen, in the two forms whose ImageNet weights
researchers have:

* `variant='caffe'`: the Caffe BN-Inception as Cadene's `pretrainedmodels`
  ports it to PyTorch (pretrainedmodels 0.7.4,
  pretrainedmodels/models/bninception.py). Every convolution has a bias and
  is followed by BatchNorm with a scale (epsilon 1e-5); convolutions pad
  k // 2 on every side; the stem's and the reductions' max pools are 3x3/2,
  unpadded, in `ceil_mode`; the blocks' 3x3 average pools pad 1 and count
  the padding; inception_5b's pool is a 3x3/1 max pool padded with -inf.
  The pool projections of inception_4c and 4d have 128 channels. Inputs are
  BGR 0..255 minus (104, 117, 128): `input_norm='caffe_bn_inception'`.
* `variant='tf_slim'`: TF-slim's `inception_v2` (tensorflow/models
  research/slim/nets/inception_v2.py, also tf_slim 1.1.0's
  nets/inception_v2.py). Conv2d_1a_7x7 is separable: a 7x7/2 depthwise
  convolution with 8 filters per input channel, then a 1x1 convolution with
  a bias and ReLU and no BatchNorm (`inception_arg_scope` gives BatchNorm to
  `slim.conv2d` only, and the published checkpoint has none there). Every
  other convolution has no bias and BatchNorm without scale (epsilon 1e-3).
  Padding is 'SAME' throughout: max pools pad with -inf, average pools
  leave the padding out of the mean. The pool projections of Mixed_4d and
  4e have 96 channels. Inputs are [-1, 1]: `input_norm='inception'`.

Both end in global average pooling and our head: TF-slim's 7x7 'VALID'
pool and the Caffe net's AvgPool2d(7) are exactly that on the 7x7 map of
224-px inputs.

The Caffe net computes only some input sizes. inception_3c and 4e
concatenate a 3x3/2 convolution padded 1 (ceil(n / 2) rows) with an
unpadded 3x3/2 ceil_mode max pool (ceil((n - 1) / 2) rows), which agree only
for even n. Both reductions see even maps for inputs of 32m - 1 .. 32m + 6
px: 224 = 32 * 7 works, 299 does not (294 and 319 do). Upstream fails in
torch.cat there; this model raises a ValueError naming the nearest sizes
that work. TF-slim's 'SAME' padding takes any size.

Module names are the paper's and the Caffe net's: `conv1_7x7_s2`,
`conv2_3x3_reduce`, `conv2_3x3`, then `inception_3a` .. `inception_5b` with
branches `1x1`, `3x3_reduce`, `3x3`, `double_3x3_reduce`, `double_3x3_1`,
`double_3x3_2` and `pool_proj`, each a `conv` and its `bn`. TF-slim's
scopes are the same layers: Mixed_3b .. Mixed_5c are inception_3a .. 5b;
Branch_0 is `1x1`; Branch_1's Conv2d_0a_1x1 and Conv2d_0b_3x3 (Conv2d_1a_3x3
in Mixed_4a/5a) are `3x3_reduce`, `3x3`; Branch_2's three are the `double_`
ones; Branch_3's Conv2d_0b_1x1 is `pool_proj`; Conv2d_2b_1x1, Conv2d_2c_3x3
are `conv2_3x3_reduce`, `conv2_3x3`; Conv2d_1a_7x7 is `conv1_7x7_s2` with
`depthwise` and a pointwise `conv`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from jax import lax

from cxr_jax.models import common
from cxr_jax.models.common import (Backbone, ConvBN, Layer, grid_geometry,
                                   lookup)


@dataclasses.dataclass(frozen=True)
class Variant:
  """What differs between the Caffe (pretrainedmodels) and TF-slim nets."""

  same_padding: bool        # TF 'SAME'; else PyTorch/Caffe k // 2 and ceil
  separable_conv1: bool     # TF-slim's depthwise x8 + pointwise Conv2d_1a
  conv_bias: bool
  bn_scale: bool
  bn_epsilon: float
  pool_proj_4c_4d: int      # Caffe 128, TF-slim 96
  input_norm: str           # models.common.INPUT_NORMS key its weights expect
  bn_momentum: float        # the upstream default, in Flax's meaning
  kernel_init: Callable[..., Any]  # the upstream initialiser (from scratch)


VARIANTS: dict[str, Variant] = {
    # PyTorch's momentum=0.1 is Flax's 0.9; its default Conv2d init is
    # kaiming_uniform_(a=sqrt(5)), i.e. U(+-1/sqrt(fan_in)).
    "caffe": Variant(
        same_padding=False, separable_conv1=False, conv_bias=True,
        bn_scale=True, bn_epsilon=1e-5, pool_proj_4c_4d=128,
        input_norm="caffe_bn_inception", bn_momentum=0.9,
        kernel_init=nn.initializers.variance_scaling(1 / 3, "fan_in",
                                                     "uniform")),
    # inception_arg_scope: decay 0.9997, epsilon 1e-3, scale off,
    # variance_scaling_initializer() (factor 2, fan in, truncated normal).
    "tf_slim": Variant(
        same_padding=True, separable_conv1=True, conv_bias=False,
        bn_scale=False, bn_epsilon=1e-3, pool_proj_4c_4d=96,
        input_norm="inception", bn_momentum=0.9997,
        kernel_init=nn.initializers.variance_scaling(2.0, "fan_in",
                                                     "truncated_normal")),
}

# TF-slim's note: "the inputs can be of any size greater 32x32". The Caffe
# net also needs a size it computes (see `caffe_size_problem`).
MIN_INPUT_SIZE = 32
FEATURE_MAP = "inception_5b"  # the last block's output, 1024 channels
# TF-slim's depthwise multiplier for Conv2d_1a_7x7: min(int(64 / 3), 8).
CONV1_DEPTHWISE_MULTIPLIER = 8

# (name, kind, widths) in the order the network applies them. 'mixed' is
# (1x1, 3x3_reduce, 3x3, double_3x3_reduce, double_3x3, pool_proj, pool)
# with pool_proj None where the variant decides (inception_4c/4d);
# 'reduction' is (3x3_reduce, 3x3, double_3x3_reduce, double_3x3).
BLOCKS: Sequence[tuple[str, str, tuple[Any, ...]]] = (
    ("inception_3a", "mixed", (64, 64, 64, 64, 96, 32, "avg")),
    ("inception_3b", "mixed", (64, 64, 96, 64, 96, 64, "avg")),
    ("inception_3c", "reduction", (128, 160, 64, 96)),
    ("inception_4a", "mixed", (224, 64, 96, 96, 128, 128, "avg")),
    ("inception_4b", "mixed", (192, 96, 128, 96, 128, 128, "avg")),
    ("inception_4c", "mixed", (160, 128, 160, 128, 160, None, "avg")),
    ("inception_4d", "mixed", (96, 128, 192, 160, 192, None, "avg")),
    ("inception_4e", "reduction", (128, 192, 192, 256)),
    ("inception_5a", "mixed", (352, 192, 320, 160, 224, 128, "avg")),
    ("inception_5b", "mixed", (352, 192, 320, 192, 224, 128, "max")),
)


def resolve_variant(name: str) -> Variant:
  return lookup(VARIANTS, name)


# --------------------------------------------------------------------------
# Windows: PyTorch's (symmetric padding, optional ceil_mode) and TF's 'SAME'
# --------------------------------------------------------------------------

def window_geometry(size: int, kernel: int, stride: int, padding,
                    ceil_mode: bool = False) -> tuple[int, int, int]:
  """(out, pad_before, pad_after) of a kernel sliding over `size` cells.

  `padding` is 'SAME' (TensorFlow: the odd pixel goes after) or an int p
  (PyTorch: p on each side). With `ceil_mode` PyTorch rounds the output up,
  so the last window may overhang the right padding, unless it would start
  beyond it (then it is dropped). `pad_after` covers every window.
  """
  if padding == "SAME":
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return out, total // 2, total - total // 2
  p = int(padding)
  # PyTorch's pooling_output_shape, which rounds toward -inf: in ceil_mode
  # a window may even be wider than the padded input.
  span = size + 2 * p - kernel
  out = (-(-span // stride) if ceil_mode else span // stride) + 1
  if ceil_mode and (out - 1) * stride >= size + p:
    out -= 1
  if out < 1:
    raise ValueError(f"a {kernel}x{kernel} window padded {p} leaves no "
                     f"output from {size} cells")
  return out, p, max((out - 1) * stride + kernel - size - p, 0)


def max_pool(x, kernel: int, stride: int, padding, ceil_mode: bool = False):
  """Max pool over NHWC `x`; padding and overhang count as -inf (PyTorch's
  and TF's max pools never pick them)."""
  (_, bh, ah), (_, bw, aw) = (
      window_geometry(n, kernel, stride, padding, ceil_mode)
      for n in x.shape[1:3])
  return common.max_pool(x, (kernel, kernel), (stride, stride),
                         ((bh, ah), (bw, aw)))


def _pool_counts(size: int, kernel: int, stride: int, padding,
                 ceil_mode: bool, count_include_pad: bool) -> np.ndarray:
  """How many cells each output window's mean divides by, along one axis.

  PyTorch's avg_pool2d counts the symmetric padding when
  `count_include_pad`, but never the ceil_mode overhang past it: the window
  [start, start + k) is clipped to end at size + p. Without
  `count_include_pad` (and in TF's 'SAME' pools) only input cells count.
  """
  out, before, _ = window_geometry(size, kernel, stride, padding, ceil_mode)
  starts = np.arange(out) * stride - before
  if count_include_pad:
    return np.minimum(starts + kernel, size + before) - starts
  return np.minimum(starts + kernel, size) - np.maximum(starts, 0)


def avg_pool(x, kernel: int, stride: int, padding, ceil_mode: bool = False,
             count_include_pad: bool = True):
  """Average pool over NHWC `x` with PyTorch's divisor rule (see
  `_pool_counts`); TF's 'SAME' average pool is padding='SAME',
  count_include_pad=False."""
  geometry = [window_geometry(n, kernel, stride, padding, ceil_mode)
              for n in x.shape[1:3]]
  (_, bh, ah), (_, bw, aw) = geometry
  total = nn.pooling.pool(x, 0.0, lax.add, (kernel, kernel),
                          (stride, stride), ((bh, ah), (bw, aw)))
  counts = [_pool_counts(n, kernel, stride, padding, ceil_mode,
                         count_include_pad) for n in x.shape[1:3]]
  divisor = np.outer(counts[0], counts[1]).astype(np.float32)
  return total / jnp.asarray(divisor[None, :, :, None], x.dtype)


# --------------------------------------------------------------------------
# Which sizes the Caffe net computes; the CAM grid
# --------------------------------------------------------------------------

def _caffe_stem(size: int) -> int:
  """Rows after the Caffe stem (conv1 7x7/2 pad 3, two ceil max pools)."""
  n = window_geometry(size, 7, 2, 3)[0]
  n = window_geometry(n, 3, 2, 0, ceil_mode=True)[0]
  return window_geometry(n, 3, 2, 0, ceil_mode=True)[0]


def caffe_size_problem(size: int) -> str | None:
  """Why the Caffe net cannot compute `size`-px inputs, or None if it can:
  the first reduction whose convolution and ceil_mode pool disagree."""
  if size < MIN_INPUT_SIZE:
    return f"{size} px is below the minimum of {MIN_INPUT_SIZE}"
  n = _caffe_stem(size)
  for block in ("inception_3c", "inception_4e"):
    conv = window_geometry(n, 3, 2, 1)[0]
    pool = window_geometry(n, 3, 2, 0, ceil_mode=True)[0]
    if conv != pool:
      return (f"{block} gets a {n}-row map: its 3x3/2 convolutions give "
              f"{conv} rows and its ceil_mode max pool {pool}")
    n = conv
  return None


def nearest_caffe_sizes(size: int) -> tuple[int | None, int]:
  """The largest size <= `size` and the smallest >= `size` that the Caffe
  net computes (None below the minimum)."""
  below = next((s for s in range(size, MIN_INPUT_SIZE - 1, -1)
                if caffe_size_problem(s) is None), None)
  above = next(s for s in range(max(size, MIN_INPUT_SIZE), size + 64)
               if caffe_size_problem(s) is None)
  return below, above


def computable_size(size: int, variant: str = "caffe",
                    round_up: bool = False) -> int:
  """`size` if `variant` computes `size`-px inputs, else the nearest size
  below it that it does (above with `round_up`, or below the minimum).
  TF-slim computes every size from MIN_INPUT_SIZE on; the Caffe net 224 but
  not 299 (-> 294, or 319 rounding up)."""
  if resolve_variant(variant).same_padding:
    return max(size, MIN_INPUT_SIZE)
  below, above = nearest_caffe_sizes(size)
  return above if round_up or below is None else below


def check_caffe_size(size: int) -> None:
  problem = caffe_size_problem(size)
  if problem is not None:
    below, above = nearest_caffe_sizes(size)
    near = f"{below} or {above}" if below else str(above)
    raise ValueError(
        f"variant='caffe' (the Caffe BN-Inception) cannot compute {size}-px "
        f"inputs: {problem}, and upstream fails to concatenate them too. "
        f"Use {near} px, or variant='tf_slim' ('SAME' padding, any size)")


def feature_grid(size: int, variant: str = "caffe"
                 ) -> tuple[int, float, float]:
  """(cells, offset, stride) of the inception_5b grid for `size`-px inputs:
  cell i's receptive field is centred at pixel offset + stride * i.

  TF-slim: five 'SAME' stride-2 layers (Conv2d_1a, two max pools, Mixed_4a
  and Mixed_5a, whose branches share one geometry). Caffe: conv1 7x7/2 pad
  3, two 3x3/2 ceil_mode pools, then inception_3c and 4e, whose branches do
  not share one: the 3x3/2 convolutions padded 1 put output cell i over
  input cells [2i - 1, 2i + 1], the unpadded pool over [2i, 2i + 2]. The
  concatenated cell sees their union, [2i - 1, 2i + 2], centred at
  2i + 0.5 (half an input cell from either branch).
  """
  v = resolve_variant(variant)
  if v.same_padding:
    return grid_geometry(size, [(7, 2, "SAME")] + [(3, 2, "SAME")] * 4)
  check_caffe_size(size)
  cells, offset, stride = size, 0.5, 1.0
  for kernel, step, pad, ceil in ((7, 2, 3, False), (3, 2, 0, True),
                                  (3, 2, 0, True)):
    out, before, _ = window_geometry(cells, kernel, step, pad, ceil)
    offset += stride * ((kernel - 1) / 2 - before)
    stride *= step
    cells = out
  for _ in ("inception_3c", "inception_4e"):
    cells = window_geometry(cells, 3, 2, 1)[0]
    offset += stride * 0.5  # the union [2i - 1, 2i + 2]: (4 - 1) / 2 - 1
    stride *= 2
  return cells, offset, stride


# --------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------

def conv_bn(v: Variant, features: int, kernel: int, stride: int = 1,
            **kwargs) -> ConvBN:
  """Conv -> BatchNorm -> ReLU as variant `v` builds and pads them."""
  padding = "SAME" if v.same_padding else ((kernel // 2, kernel // 2),) * 2
  return ConvBN(features, (kernel, kernel), (stride, stride), padding,
                bn_epsilon=v.bn_epsilon, bn_scale=v.bn_scale,
                kernel_init=v.kernel_init, use_bias=v.conv_bias, **kwargs)


def halving_max_pool(v: Variant, x):
  """The stem's and the reductions' 3x3/2 max pool: TF's 'SAME', or the
  Caffe net's unpadded one in ceil_mode."""
  if v.same_padding:
    return max_pool(x, 3, 2, "SAME")
  return max_pool(x, 3, 2, 0, ceil_mode=True)


class _Layer(Layer):
  """Settings every layer shares (variant and bn_momentum resolved)."""

  variant: str = "caffe"
  bn_momentum: float = 0.9

  def conv_bn(self, features: int, kernel: int, name: str, stride: int = 1
              ) -> ConvBN:
    return conv_bn(resolve_variant(self.variant), features, kernel, stride,
                   name=name, **self.settings())

  def conv_branches(self, x, train: bool, widths: Sequence[int],
                    stride: int = 1) -> list:
    """The two branches every block has, 1x1 -> 3x3 and 1x1 -> 3x3 -> 3x3
    (`widths`: 3x3_reduce, 3x3, double_3x3_reduce, double_3x3), whose last
    convolutions have `stride`."""
    c3r, c3, cdr, cd = widths
    b3 = self.conv_bn(c3r, 1, "3x3_reduce")(x, train)
    b3 = self.conv_bn(c3, 3, "3x3", stride)(b3, train)
    bd = self.conv_bn(cdr, 1, "double_3x3_reduce")(x, train)
    bd = self.conv_bn(cd, 3, "double_3x3_1")(bd, train)
    bd = self.conv_bn(cd, 3, "double_3x3_2", stride)(bd, train)
    return [b3, bd]


class SeparableConv1(_Layer):
  """TF-slim's Conv2d_1a_7x7: depthwise 7x7/2 (8 filters per input channel,
  no bias), pointwise 1x1 with a bias, ReLU; no BatchNorm."""

  features: int = 64

  @nn.compact
  def __call__(self, x, train: bool):
    v = resolve_variant(self.variant)
    channels = x.shape[-1]
    # Grouped conv output channel c * 8 + m is TF's depthwise filter
    # [..., c, m], so TF's (7, 7, 3, 8) kernel reshapes to (7, 7, 1, 24).
    x = nn.Conv(channels * CONV1_DEPTHWISE_MULTIPLIER, (7, 7), strides=(2, 2),
                padding="SAME", feature_group_count=channels, use_bias=False,
                dtype=self.dtype, kernel_init=v.kernel_init,
                name="depthwise")(x)
    x = nn.Conv(self.features, (1, 1), use_bias=True, dtype=self.dtype,
                kernel_init=v.kernel_init, name="conv")(x)
    return nn.relu(x)


class Mixed(_Layer):
  """An Inception block: 1x1 | 1x1 -> 3x3 | 1x1 -> 3x3 -> 3x3 | pool -> 1x1,
  concatenated in that order."""

  widths: tuple[Any, ...] = ()

  @nn.compact
  def __call__(self, x, train: bool):
    v = resolve_variant(self.variant)
    c1, c3r, c3, cdr, cd, proj, pool = self.widths
    proj = v.pool_proj_4c_4d if proj is None else proj
    b1 = self.conv_bn(c1, 1, "1x1")(x, train)
    b3, bd = self.conv_branches(x, train, (c3r, c3, cdr, cd))
    padding = "SAME" if v.same_padding else 1
    if pool == "avg":
      # Caffe counts the padding (count_include_pad=True); TF's 'SAME' pool
      # does not.
      bp = avg_pool(x, 3, 1, padding, ceil_mode=not v.same_padding,
                    count_include_pad=not v.same_padding)
    else:
      bp = max_pool(x, 3, 1, padding, ceil_mode=not v.same_padding)
    bp = self.conv_bn(proj, 1, "pool_proj")(bp, train)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class Reduction(_Layer):
  """A stride-2 block: 1x1 -> 3x3/2 | 1x1 -> 3x3 -> 3x3/2 | max pool 3x3/2."""

  widths: tuple[int, ...] = ()

  @nn.compact
  def __call__(self, x, train: bool):
    v = resolve_variant(self.variant)
    branches = self.conv_branches(x, train, self.widths, stride=2)
    return jnp.concatenate(branches + [halving_max_pool(v, x)], axis=-1)


class BNInception(Backbone):
  """BN-Inception / Inception V2 with a `num_classes`-way linear head.

  Attributes:
    variant: 'caffe' (pretrainedmodels' port of the Caffe net) or 'tf_slim'
      (TF-slim's inception_v2); see the module docstring. Converted weights
      record theirs.
    input_norm: what the weights expect of the [-1, 1] input; None takes the
      variant's ('caffe_bn_inception' or 'inception').
    bn_momentum: Flax's meaning (weight of the old value); None takes the
      variant's upstream default (PyTorch 0.9, TF-slim 0.9997).
    bn_axis_name: training-mode BatchNorm averages its batch statistics over
      this named axis (under shard_map/pmap).
    dtype: computation dtype (e.g. bfloat16); parameters stay float32.
    dropout_rate: dropout before the head in training (TF-slim trained with
      0.2; the Caffe port has none).

  `apply(variables, x, train=False, return_features=False)` takes NHWC
  inputs in [-1, 1]; with `return_features` it returns `(logits, out)` with
  "inception_5b" beside `models.common.classifier_head`'s maps.
  """

  variant: str = "caffe"
  VARIANTS = VARIANTS

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False):
    v = self.upstream()
    x = self.model_input(x, MIN_INPUT_SIZE, "BN-Inception")
    if not v.same_padding:
      for side in sorted(set(x.shape[1:3])):
        check_caffe_size(side)
    settings = self.layer_settings()
    if v.separable_conv1:
      x = SeparableConv1(features=64, name="conv1_7x7_s2", variant=self.variant,
                         **settings)(x, train)
    else:
      x = conv_bn(v, 64, 7, 2, name="conv1_7x7_s2", **settings)(x, train)
    x = halving_max_pool(v, x)
    x = conv_bn(v, 64, 1, name="conv2_3x3_reduce", **settings)(x, train)
    x = conv_bn(v, 192, 3, name="conv2_3x3", **settings)(x, train)
    x = halving_max_pool(v, x)
    for name, kind, widths in BLOCKS:
      block = Mixed if kind == "mixed" else Reduction
      x = block(widths=widths, name=name, variant=self.variant,
                **settings)(x, train)
    return self.outputs(x, {FEATURE_MAP: x}, train, return_features)

  def feature_grid(self, size: int) -> tuple[int, float, float]:
    """The CAM grid for `size`-px inputs (see `feature_grid`)."""
    return feature_grid(size, self.variant)


MODELS = {
    "bn_inception": (BNInception, {}),
}
