"""Inception V4 in Flax linen, layer for layer the PyTorch port that timm and
Cadene's `pretrainedmodels` share (Szegedy et al. 2016, "Inception-v4,
Inception-ResNet and the Impact of Residual Connections on Learning").

That port (`timm/models/inception_v4.py`, `pretrainedmodels/models/
inceptionv4.py`) carries TF-slim's ImageNet weights:

* every convolution has no bias and is followed by BatchNorm with eps=1e-3
  *with* a scale (PyTorch's affine BatchNorm2d), then ReLU; our BatchNorm
  keeps the scale, so the weights load without folding and train the same;
* the stem and the stride-2 reductions pad nothing ('VALID'); the stride-1
  convolutions pad symmetrically by k // 2, which is 'SAME' for odd kernels;
* the block average pools exclude the padding (`count_include_pad=False`).

Module names are TF-slim's end points (`Mixed_5b` ... `Mixed_7d`), and inside
a block timm's (`branch1_0` for `branch1.0`; a pool branch's conv, timm's
`branch3.1`, is `branch_pool`). `cxr_jax.weights.inception_v4` maps timm's
`features.N...` keys onto them explicitly.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from cxr_jax.models.common import (LSE_R, ConvBN, Dtype, check_input,
                                   grid_geometry, head_outputs,
                                   normalize_input)

BN_EPSILON = 1e-3
# PyTorch's momentum=0.1 (the new value's weight) is Flax's 0.9.
BN_MOMENTUM = 0.9
# The VALID stem and the three VALID reductions leave a 1x1 map at 75 px.
MIN_INPUT_SIZE = 75
FEATURE_MAP = "features"  # timm's forward_features: 1536 channels


def conv_bn(features, kernel, strides=(1, 1), padding="SAME", **kwargs
            ) -> ConvBN:
  """timm's ConvNormAct, pretrainedmodels' BasicConv2d: conv (no bias) ->
  BatchNorm (eps 1e-3, with PyTorch's gamma) -> ReLU."""
  return ConvBN(features, kernel, strides, padding, bn_epsilon=BN_EPSILON,
                bn_scale=True, **kwargs)


class _Block(nn.Module):
  dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None
  bn_momentum: float = BN_MOMENTUM

  def conv(self, features, kernel, name, strides=(1, 1), padding="SAME"):
    return conv_bn(features, kernel, strides, padding, dtype=self.dtype,
                   bn_axis_name=self.bn_axis_name,
                   bn_momentum=self.bn_momentum, name=name)

  def pool_branch(self, x, features, train):
    x = nn.avg_pool(x, (3, 3), strides=(1, 1), padding="SAME",
                    count_include_pad=False)
    return self.conv(features, (1, 1), "branch_pool")(x, train)


def _max_pool(x):
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class Mixed3a(_Block):
  """64 -> 160 channels, stride 2: max pool beside a 3x3/2 conv."""

  @nn.compact
  def __call__(self, x, train: bool):
    conv = self.conv(96, (3, 3), "conv", (2, 2), "VALID")(x, train)
    return jnp.concatenate([_max_pool(x), conv], axis=-1)


class Mixed4a(_Block):
  """160 -> 192 channels; both branches end in a VALID 3x3 (-2 px)."""

  @nn.compact
  def __call__(self, x, train: bool):
    b0 = self.conv(64, (1, 1), "branch0_0")(x, train)
    b0 = self.conv(96, (3, 3), "branch0_1", padding="VALID")(b0, train)
    b1 = self.conv(64, (1, 1), "branch1_0")(x, train)
    b1 = self.conv(64, (1, 7), "branch1_1")(b1, train)
    b1 = self.conv(64, (7, 1), "branch1_2")(b1, train)
    b1 = self.conv(96, (3, 3), "branch1_3", padding="VALID")(b1, train)
    return jnp.concatenate([b0, b1], axis=-1)


class Mixed5a(_Block):
  """192 -> 384 channels, stride 2: a 3x3/2 conv beside a max pool."""

  @nn.compact
  def __call__(self, x, train: bool):
    conv = self.conv(192, (3, 3), "conv", (2, 2), "VALID")(x, train)
    return jnp.concatenate([conv, _max_pool(x)], axis=-1)


class InceptionA(_Block):
  """35x35 block, 384 channels (Mixed_5b-e)."""

  @nn.compact
  def __call__(self, x, train: bool):
    b0 = self.conv(96, (1, 1), "branch0")(x, train)
    b1 = self.conv(64, (1, 1), "branch1_0")(x, train)
    b1 = self.conv(96, (3, 3), "branch1_1")(b1, train)
    b2 = self.conv(64, (1, 1), "branch2_0")(x, train)
    b2 = self.conv(96, (3, 3), "branch2_1")(b2, train)
    b2 = self.conv(96, (3, 3), "branch2_2")(b2, train)
    b3 = self.pool_branch(x, 96, train)
    return jnp.concatenate([b0, b1, b2, b3], axis=-1)


class ReductionA(_Block):
  """35 -> 17, 384 -> 1024 channels (Mixed_6a)."""

  @nn.compact
  def __call__(self, x, train: bool):
    b0 = self.conv(384, (3, 3), "branch0", (2, 2), "VALID")(x, train)
    b1 = self.conv(192, (1, 1), "branch1_0")(x, train)
    b1 = self.conv(224, (3, 3), "branch1_1")(b1, train)
    b1 = self.conv(256, (3, 3), "branch1_2", (2, 2), "VALID")(b1, train)
    return jnp.concatenate([b0, b1, _max_pool(x)], axis=-1)


class InceptionB(_Block):
  """17x17 block, 1024 channels (Mixed_6b-h)."""

  @nn.compact
  def __call__(self, x, train: bool):
    b0 = self.conv(384, (1, 1), "branch0")(x, train)
    b1 = self.conv(192, (1, 1), "branch1_0")(x, train)
    b1 = self.conv(224, (1, 7), "branch1_1")(b1, train)
    b1 = self.conv(256, (7, 1), "branch1_2")(b1, train)
    b2 = self.conv(192, (1, 1), "branch2_0")(x, train)
    b2 = self.conv(192, (7, 1), "branch2_1")(b2, train)
    b2 = self.conv(224, (1, 7), "branch2_2")(b2, train)
    b2 = self.conv(224, (7, 1), "branch2_3")(b2, train)
    b2 = self.conv(256, (1, 7), "branch2_4")(b2, train)
    b3 = self.pool_branch(x, 128, train)
    return jnp.concatenate([b0, b1, b2, b3], axis=-1)


class ReductionB(_Block):
  """17 -> 8, 1024 -> 1536 channels (Mixed_7a)."""

  @nn.compact
  def __call__(self, x, train: bool):
    b0 = self.conv(192, (1, 1), "branch0_0")(x, train)
    b0 = self.conv(192, (3, 3), "branch0_1", (2, 2), "VALID")(b0, train)
    b1 = self.conv(256, (1, 1), "branch1_0")(x, train)
    b1 = self.conv(256, (1, 7), "branch1_1")(b1, train)
    b1 = self.conv(320, (7, 1), "branch1_2")(b1, train)
    b1 = self.conv(320, (3, 3), "branch1_3", (2, 2), "VALID")(b1, train)
    return jnp.concatenate([b0, b1, _max_pool(x)], axis=-1)


class InceptionC(_Block):
  """8x8 block, 1536 channels (Mixed_7b-d)."""

  @nn.compact
  def __call__(self, x, train: bool):
    b0 = self.conv(256, (1, 1), "branch0")(x, train)
    b1 = self.conv(384, (1, 1), "branch1_0")(x, train)
    b1 = jnp.concatenate([self.conv(256, (1, 3), "branch1_1a")(b1, train),
                          self.conv(256, (3, 1), "branch1_1b")(b1, train)],
                         axis=-1)
    b2 = self.conv(384, (1, 1), "branch2_0")(x, train)
    b2 = self.conv(448, (3, 1), "branch2_1")(b2, train)
    b2 = self.conv(512, (1, 3), "branch2_2")(b2, train)
    b2 = jnp.concatenate([self.conv(256, (1, 3), "branch2_3a")(b2, train),
                          self.conv(256, (3, 1), "branch2_3b")(b2, train)],
                         axis=-1)
    b3 = self.pool_branch(x, 256, train)
    return jnp.concatenate([b0, b1, b2, b3], axis=-1)


# (name, features, kernel, strides, padding): timm's features.0-2.
STEM: Sequence[tuple[str, int, tuple[int, int], tuple[int, int], str]] = (
    ("Conv2d_1a_3x3", 32, (3, 3), (2, 2), "VALID"),
    ("Conv2d_2a_3x3", 32, (3, 3), (1, 1), "VALID"),
    ("Conv2d_2b_3x3", 64, (3, 3), (1, 1), "SAME"),
)
# The blocks in order: timm's features.3 ... features.21.
BLOCKS: Sequence[tuple[str, type[_Block]]] = (
    ("Mixed_3a", Mixed3a), ("Mixed_4a", Mixed4a), ("Mixed_5a", Mixed5a),
    *((f"Mixed_5{c}", InceptionA) for c in "bcde"),
    ("Mixed_6a", ReductionA),
    *((f"Mixed_6{c}", InceptionB) for c in "bcdefgh"),
    ("Mixed_7a", ReductionB),
    *((f"Mixed_7{c}", InceptionC) for c in "bcd"),
)
# (kernel, stride, padding) of every layer that moves or shrinks the grid:
# the two VALID stem convs, Mixed_3a's stride 2, Mixed_4a's VALID 3x3 and the
# stride-2 Mixed_5a, Mixed_6a and Mixed_7a.
GRID_LAYERS = ((3, 2, "VALID"), (3, 1, "VALID"), (3, 2, "VALID"),
               (3, 1, "VALID"), (3, 2, "VALID"), (3, 2, "VALID"),
               (3, 2, "VALID"))


def feature_grid(size: int) -> tuple[int, float, float]:
  """(cells, offset, stride) of the final 1536-channel grid."""
  return grid_geometry(size, GRID_LAYERS)


class InceptionV4(nn.Module):
  """Inception V4 with a `num_classes`-way linear head (logits).

  Attributes follow the zoo interface (models.common). timm's and
  pretrainedmodels' ImageNet weights expect inputs normalised with mean 0.5
  and std 0.5, i.e. [-1, 1]: `input_norm='inception'`. The head is global
  average pooling (timm's; pretrainedmodels' 8x8 AvgPool2d is the same at
  299 px) and a Dense layer.

  With `return_features=True` it returns `(logits, out)`, out holding
  'features' (timm's `forward_features`), 'class_maps', 'feature_map' and
  'pooled'.
  """

  num_classes: int = 1000
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None
  bn_momentum: float = BN_MOMENTUM
  head_pooling: str = "avg"
  lse_r: float = LSE_R
  input_norm: str = "inception"

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False):
    check_input(x, MIN_INPUT_SIZE, "InceptionV4")
    common: dict[str, Any] = dict(
        dtype=self.dtype, bn_axis_name=self.bn_axis_name,
        bn_momentum=self.bn_momentum)
    x = normalize_input(x, self.input_norm).astype(self.dtype)
    for name, features, kernel, strides, padding in STEM:
      x = conv_bn(features, kernel, strides, padding, name=name,
                  **common)(x, train)
    for name, block in BLOCKS:
      x = block(name=name, **common)(x, train)
    return head_outputs(self, x, {FEATURE_MAP: x}, train, return_features)

  def feature_grid(self, size: int) -> tuple[int, float, float]:
    """The final grid for `size`-px inputs (see `feature_grid`)."""
    return feature_grid(size)


MODELS = {"inception_v4": (InceptionV4, {})}
