"""ResNet-50/101/152 (He et al. 2016, "Deep Residual Learning for Image
Recognition") in Flax linen, in the two forms whose ImageNet weights
researchers have:

* `variant='keras'`: `keras.applications.ResNet50/101/152`, the original
  Caffe ResNet ("v1"). The bottleneck's stride sits on its first 1x1
  convolution, every convolution has a bias, BatchNorm uses epsilon 1.001e-5,
  and the inputs are Caffe-normalised (BGR, mean subtracted, 0..255 scale).
* `variant='torchvision'`: `torchvision.models.resnet50/101/152` ("v1.5"):
  the stride sits on the 3x3 convolution, convolutions have no bias,
  BatchNorm uses epsilon 1e-5, and the inputs are ImageNet mean/std
  normalised.

Both pad exactly as their upstream: Keras zero-pads explicitly
(`ZeroPadding2D` 3 before the 7x7 stem, 1 before the max pool) and runs
'valid' layers, with 'same' 3x3 convolutions at stride 1 (1 on each side);
torchvision pads symmetrically (`padding=3` / `padding=1`) and its max pool
pads with -inf. After the stem's ReLU zero and -inf padding give the same
maximum, but each variant does what its upstream does.

Module names follow torchvision's (`conv1`, `bn1`, `layer1/0/conv1`,
`layer1/0/downsample/conv`, ...); `cxr_jax.weights.resnet` maps Keras'
`conv2_block1_1_conv` names onto them. A stage's blocks after its first are
equal and scanned (`models.common.repeat`): `layer3/repeated/conv1/kernel`
stacks torchvision's `layer3.1` ... `layer3.22` (ResNet-101) on its leading
axis (see `REPEATED`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from cxr_jax.models.common import (Backbone, Layer, batch_norm, grid_geometry,
                                   lookup, max_pool, repeat)


@dataclasses.dataclass(frozen=True)
class Variant:
  """What differs between the Keras (v1) and torchvision (v1.5) ResNets."""

  stride_on_3x3: bool       # v1.5: stride on conv2 (3x3); v1: on conv1 (1x1)
  conv_bias: bool           # Keras' Conv2D default use_bias=True
  bn_epsilon: float
  input_norm: str           # models.common.INPUT_NORMS key its weights expect
  bn_momentum: float        # the upstream default, in Flax's meaning
  kernel_init: Callable[..., Any]  # the upstream initialiser (from scratch)
  zero_pad_pool: bool       # Keras' ZeroPadding2D before the max pool


VARIANTS: dict[str, Variant] = {
    "keras": Variant(
        stride_on_3x3=False, conv_bias=True, bn_epsilon=1.001e-5,
        input_norm="caffe", bn_momentum=0.99,
        kernel_init=nn.initializers.glorot_uniform(), zero_pad_pool=True),
    # torchvision: momentum=0.1 (weight of the new value) is Flax's 0.9;
    # kaiming_normal_(mode='fan_out', nonlinearity='relu') is untruncated.
    "torchvision": Variant(
        stride_on_3x3=True, conv_bias=False, bn_epsilon=1e-5,
        input_norm="torch", bn_momentum=0.9,
        kernel_init=nn.initializers.variance_scaling(2.0, "fan_out",
                                                     "normal"),
        zero_pad_pool=False),
}

# Bottleneck blocks per stage (layer1..layer4), as in both upstreams.
STAGE_BLOCKS: dict[int, tuple[int, int, int, int]] = {
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}
# Each stage's blocks after its first (the projection block) run as one
# scanned group: group path -> the blocks' paths, by depth.
GROUP = "repeated"
REPEATED: dict[int, dict[str, tuple[str, ...]]] = {
    depth: {f"layer{s + 1}/{GROUP}": tuple(f"layer{s + 1}/{b}"
                                             for b in range(1, blocks))
            for s, blocks in enumerate(stages)}
    for depth, stages in STAGE_BLOCKS.items()}
STAGE_PLANES = (64, 128, 256, 512)
EXPANSION = 4
# Keras' obtain_input_shape floor for these applications (min_size=32): the
# 32x downsampling leaves a 1x1 layer4 map.
MIN_INPUT_SIZE = 32
FEATURE_MAP = "layer4"  # the last convolutional map, 2048 channels, for CAM


def resolve_variant(name: str) -> Variant:
  return lookup(VARIANTS, name)


def _conv(v: Variant, dtype, features, kernel, stride, pad, name):
  """A convolution padded `pad` on every side, as upstream pads it."""
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), use_bias=v.conv_bias,
                 dtype=dtype, kernel_init=v.kernel_init, name=name)


class _Block(Layer):
  """Settings every block shares (bn_momentum already resolved)."""

  variant: str = "torchvision"
  bn_momentum: float = 0.9

  def conv(self, features, kernel, stride, pad, name):
    return _conv(resolve_variant(self.variant), self.dtype, features, kernel,
                 stride, pad, name)

  def bn(self, train, name):
    return self.batch_norm(train, resolve_variant(self.variant).bn_epsilon,
                           name)

  def settings(self) -> dict[str, Any]:
    return dict(super().settings(), variant=self.variant)


class Downsample(_Block):
  """The projection shortcut: 1x1 conv (strided) -> BatchNorm."""

  features: int = 256
  stride: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    x = self.conv(self.features, 1, self.stride, 0, "conv")(x)
    return self.bn(train, "bn")(x)


class Bottleneck(_Block):
  """1x1 -> 3x3 -> 1x1 (x4 channels) plus the shortcut, then ReLU."""

  planes: int = 64
  stride: int = 1
  downsample: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    v = resolve_variant(self.variant)
    s1, s2 = (1, self.stride) if v.stride_on_3x3 else (self.stride, 1)
    shortcut = x
    if self.downsample:
      shortcut = Downsample(features=self.planes * EXPANSION,
                            stride=self.stride, name="downsample",
                            **self.settings())(x, train)
    y = self.conv(self.planes, 1, s1, 0, "conv1")(x)
    y = nn.relu(self.bn(train, "bn1")(y))
    y = self.conv(self.planes, 3, s2, 1, "conv2")(y)
    y = nn.relu(self.bn(train, "bn2")(y))
    y = self.conv(self.planes * EXPANSION, 1, 1, 0, "conv3")(y)
    y = self.bn(train, "bn3")(y)
    return nn.relu(y + shortcut)


class ResLayer(_Block):
  """One stage (torchvision's `layerN`): block "0" has the projection
  shortcut and the stage's stride; the `blocks - 1` equal ones after it run
  as one scanned group named `GROUP`."""

  planes: int = 64
  blocks: int = 3
  stride: int = 1
  unroll: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    x = Bottleneck(planes=self.planes, stride=self.stride, downsample=True,
                   name="0", **self.settings())(x, train)
    return repeat(Bottleneck(planes=self.planes, name=GROUP,
                             **self.settings()),
                  x, train, self.blocks - 1, self.unroll)


def feature_grid(size: int, variant: str = "torchvision"
                 ) -> tuple[int, float, float]:
  """(cells, offset, stride) of the layer4 grid for `size`-px inputs: cell
  i's receptive field is centred at pixel coordinate offset + stride * i.

  The stem is conv 7x7/2 pad 3 and max pool 3x3/2 pad 1; each later stage
  halves the grid with a 3x3/2 pad 1 (torchvision) or 1x1/2 (Keras)
  convolution, whose centres coincide. The projection shortcut (1x1/2) keeps
  the same grid.
  """
  v = resolve_variant(variant)
  stage = (3, 2, 1) if v.stride_on_3x3 else (1, 2, 0)
  return grid_geometry(size, [(7, 2, 3), (3, 2, 1), stage, stage, stage])


class ResNet(Backbone):
  """ResNet-50/101/152 with a `num_classes`-way linear head (logits).

  Attributes:
    depth: 50, 101 or 152.
    variant: 'keras' (Caffe/He et al. v1) or 'torchvision' (v1.5); see the
      module docstring. Converted weights record theirs.
    input_norm: what the weights expect of the [-1, 1] input; None takes the
      variant's ('caffe' for Keras, 'torch' for torchvision).
    bn_momentum: Flax's meaning (weight of the old value); None takes the
      variant's upstream default (Keras 0.99, torchvision 0.9).
    bn_axis_name: training-mode BatchNorm averages its batch statistics over
      this named axis (under shard_map/pmap).
    dtype: computation dtype (e.g. bfloat16); parameters stay float32.

  `apply(variables, x, train=False, return_features=False)` takes NHWC
  inputs in [-1, 1]; with `return_features` it returns `(logits, out)` with
  "layer4" beside `models.common.classifier_head`'s maps.
  """

  depth: int = 50
  variant: str = "torchvision"
  # Trace every repeated block instead of scanning (see `common.repeat`):
  # the same variables and numbers, a longer compile and a faster step;
  # XLA's cost analysis needs it.
  unroll_blocks: bool = False
  VARIANTS = VARIANTS

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False):
    v = self.upstream()
    stages = lookup(STAGE_BLOCKS, self.depth, "depth")
    x = self.model_input(x, MIN_INPUT_SIZE, "ResNet")
    settings = self.layer_settings(variant=self.variant)
    x = _conv(v, self.dtype, 64, 7, 2, 3, "conv1")(x)
    x = nn.relu(batch_norm(train, epsilon=v.bn_epsilon,
                           momentum=settings["bn_momentum"],
                           axis_name=self.bn_axis_name, dtype=self.dtype,
                           name="bn1")(x))
    if v.zero_pad_pool:  # Keras: ZeroPadding2D(1), then a 'valid' pool
      x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
      x = max_pool(x, (3, 3), (2, 2), "VALID")
    else:  # torchvision: MaxPool2d(3, 2, padding=1) pads with -inf
      x = max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))
    for i, (planes, blocks) in enumerate(zip(STAGE_PLANES, stages)):
      x = ResLayer(planes=planes, blocks=blocks, stride=1 if i == 0 else 2,
                   unroll=self.unroll_blocks, name=f"layer{i + 1}",
                   **settings)(x, train)
    return self.outputs(x, {FEATURE_MAP: x}, train, return_features)

  def feature_grid(self, size: int) -> tuple[int, float, float]:
    """The CAM grid for `size`-px inputs (see `feature_grid`)."""
    return feature_grid(size, self.variant)


MODELS = {
    "resnet50": (ResNet, {"depth": 50}),
    "resnet101": (ResNet, {"depth": 101}),
    "resnet152": (ResNet, {"depth": 152}),
}
