"""Inception-ResNet-V2 in Flax linen, layer for layer the Keras application.

Szegedy et al. 2016, "Inception-v4, Inception-ResNet and the Impact of
Residual Connections on Learning". The architecture follows
`keras.applications.InceptionResNetV2` (itself TF-slim's
`inception_resnet_v2`), so that Keras' ImageNet weights load unchanged:

* every convolution of a branch has no bias and is followed by BatchNorm with
  epsilon=1e-3 and no scale (the ReLU after it makes a scale redundant);
* each residual block ends in a 1x1 'up' convolution *with* a bias and no
  BatchNorm, whose output is scaled (0.17, 0.1, 0.2 for the 35/17/8 blocks)
  before it is added to the shortcut; ReLU follows the sum, except in the
  last block8, which has scale 1.0 and no activation;
* the stem and the stride-2 reductions are 'VALID', everything else 'SAME';
  mixed_5b's average pool excludes the padding from the mean (TensorFlow).

Module names: the stem and branch names are TF-slim's/timm's (`conv2d_1a`,
`mixed_5b/branch1_0`, a pool branch's conv is `branch_pool`), the repeated
blocks carry Keras' block types, the last conv Keras' name (`conv_7b`), and
a block's up convolution is `conv` (Keras' `block35_1_conv`). The repeated
blocks are scanned: `block35/conv/kernel` stacks Keras' `block35_1_conv` ...
`block35_10_conv` on its leading axis (see `REPEATED`).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from cxr_jax.models.common import (InceptionBackbone, InceptionBlock, Unit,
                                   inception_a, inception_grid, lookup,
                                   max_pool_3x3, reduction_a, repeat,
                                   slim_stem)

# Keras' BatchNormalization defaults, with which the ImageNet statistics were
# made; Flax's `momentum` means what Keras' does (the old value's weight).
BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99
# Keras' `min_size` for this application: the 3x3 VALID reductions need it.
MIN_INPUT_SIZE = 75
FEATURE_MAP = "conv_7b"  # the last convolutional map, 1536 channels

# (block type, repeats, residual scale): Keras' `inception_resnet_block`.
REPEATS: Sequence[tuple[str, int, float]] = (
    ("block35", 10, 0.17), ("block17", 20, 0.1), ("block8", 10, 0.2))
# The residual blocks run as three scanned groups (`repeat`), their variables
# stacked under the block type's name, in Keras' order (`block35_1` is
# `block35`'s index 0). The last block8 has scale 1.0 and no ReLU: Keras'
# `block8_10` stays a module of its own.
LAST_BLOCK = "block8_10"
REPEATED: dict[str, tuple[str, ...]] = {
    block_type: tuple(f"{block_type}_{i}" for i in range(1, repeats + 1)
                      if f"{block_type}_{i}" != LAST_BLOCK)
    for block_type, repeats, _ in REPEATS}
# TF-slim's stem, as Inception V3's, and the convolutions a 3x3/2 max pool
# follows.
STEM = slim_stem(
    ("conv2d_1a", "conv2d_2a", "conv2d_2b", "conv2d_3b", "conv2d_4a"))
STEM_POOLS = ("conv2d_2b", "conv2d_4a")


def feature_grid(size: int) -> tuple[int, float, float]:
  """(cells, offset, stride) of the conv_7b grid for `size`-px inputs: the
  VALID stem and the two VALID reductions move it (see `inception_grid`)."""
  return inception_grid(size)


class _Block(InceptionBlock):
  """Keras' `conv2d_bn`: conv (no bias) -> BatchNorm (eps 1e-3, no scale: the
  ReLU after it makes one redundant) -> ReLU."""

  bn_epsilon = BN_EPSILON
  bn_scale = False


class Mixed5b(_Block):
  """Inception-A block after the stem: 192 -> 320 channels."""

  def branches(self):
    return inception_a(self.avg_pool_3x3, 96, (48, 64), (64, 96, 96), 64,
                       kernel=(5, 5))


class Mixed6a(_Block):
  """Reduction-A: 35 -> 17, 320 -> 1088 channels."""

  def branches(self):
    return reduction_a(k=256, l=256, m=384, n=384)


class Mixed7a(_Block):
  """Reduction-B: 17 -> 8, 1088 -> 2080 channels."""

  def branches(self):
    return (
        [Unit(256, (1, 1), "branch0_0"),
         Unit(384, (3, 3), "branch0_1", (2, 2), "VALID")],
        [Unit(256, (1, 1), "branch1_0"),
         Unit(288, (3, 3), "branch1_1", (2, 2), "VALID")],
        [Unit(256, (1, 1), "branch2_0"), Unit(288, (3, 3), "branch2_1"),
         Unit(320, (3, 3), "branch2_2", (2, 2), "VALID")],
        [max_pool_3x3],
    )


# The branches of Keras' `inception_resnet_block` by block type.
RESIDUAL_BRANCHES = {
    "block35": (
        [Unit(32, (1, 1), "branch0")],
        [Unit(32, (1, 1), "branch1_0"), Unit(32, (3, 3), "branch1_1")],
        [Unit(32, (1, 1), "branch2_0"), Unit(48, (3, 3), "branch2_1"),
         Unit(64, (3, 3), "branch2_2")],
    ),
    "block17": (
        [Unit(192, (1, 1), "branch0")],
        [Unit(128, (1, 1), "branch1_0"), Unit(160, (1, 7), "branch1_1"),
         Unit(192, (7, 1), "branch1_2")],
    ),
    "block8": (
        [Unit(192, (1, 1), "branch0")],
        [Unit(192, (1, 1), "branch1_0"), Unit(224, (1, 3), "branch1_1"),
         Unit(256, (3, 1), "branch1_2")],
    ),
}


class ResidualBlock(_Block):
  """Keras' `inception_resnet_block`: x + scale * up(concat(branches)),
  then ReLU unless `activation` is False (the last block8)."""

  block_type: str = "block35"
  scale: float = 0.17
  activation: bool = True

  def branches(self):
    return lookup(RESIDUAL_BRANCHES, self.block_type, "block_type")

  @nn.compact
  def __call__(self, x, train: bool):
    mixed = self.side_by_side(x, train, self.branches())
    up = nn.Conv(x.shape[-1], (1, 1), use_bias=True, dtype=self.dtype,
                 name="conv")(mixed)
    x = x + up * jnp.asarray(self.scale, up.dtype)
    return nn.relu(x) if self.activation else x


class InceptionResNetV2(InceptionBackbone):
  """Inception-ResNet-V2 with a `num_classes`-way linear head (logits).

  Attributes follow the zoo interface (models.common): `dtype` is the
  computation dtype (parameters stay float32), `bn_axis_name` averages
  training-mode batch statistics over a named device axis, `bn_momentum` is
  Flax's (Keras') meaning, `head_pooling`/`lse_r` choose the head's pooling
  and `input_norm` what the weights expect of our [-1, 1] input (Keras'
  ImageNet weights: 'inception', i.e. [-1, 1] as is).

  With `return_features=True` it returns `(logits, out)`, out holding
  'conv_7b' (the 1536-channel map, Keras' `conv_7b_ac`), 'class_maps',
  'feature_map' and 'pooled'.
  """

  bn_momentum: float = BN_MOMENTUM
  # Trace every repeated block instead of scanning (see `common.repeat`):
  # the same variables and numbers, a longer compile and a faster step;
  # XLA's cost analysis needs it.
  unroll_blocks: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False):
    x = self.model_input(x, MIN_INPUT_SIZE, "InceptionResNetV2")
    settings = self.layer_settings()
    x = _Block.stem(x, train, STEM, pool_after=STEM_POOLS, **settings)
    x = Mixed5b(name="mixed_5b", **settings)(x, train)
    reductions = {"block35": Mixed6a(name="mixed_6a", **settings),
                  "block17": Mixed7a(name="mixed_7a", **settings)}
    for block_type, _, scale in REPEATS:
      x = repeat(ResidualBlock(block_type=block_type, scale=scale,
                               name=block_type, **settings),
                 x, train, len(REPEATED[block_type]), self.unroll_blocks)
      if block_type in reductions:
        x = reductions[block_type](x, train)
    x = ResidualBlock(block_type="block8", scale=1.0, activation=False,
                      name=LAST_BLOCK, **settings)(x, train)
    x = _Block.conv_bn(1536, (1, 1), name="conv_7b", **settings)(x, train)
    return self.outputs(x, {FEATURE_MAP: x}, train, return_features)

  def feature_grid(self, size: int) -> tuple[int, float, float]:
    """The conv_7b grid for `size`-px inputs (see `feature_grid`)."""
    return feature_grid(size)


MODELS = {"inception_resnet_v2": (InceptionResNetV2, {})}
