"""DenseNet-BC 121/169/201 in Flax linen (Huang et al. 2017); DenseNet-121
is CheXNet's backbone (Rajpurkar et al. 2017).

Layer for layer both `keras.applications.DenseNet121/169/201` and
torchvision's `densenet121/169/201`, which compute the same network:

* stem: 7x7/2 convolution with 3 pixels of zero padding on each side (Keras:
  `ZeroPadding2D(3)` + a VALID conv; torchvision: `padding=3`), BN, ReLU,
  3x3/2 max pool with 1 pixel of padding. Keras pads that pool with zeros and
  torchvision with -inf; after the ReLU every value is >= 0 and every window
  holds a real pixel, so the two maxima agree;
* dense layer: BN, ReLU, 1x1 conv to 4 * growth, BN, ReLU, 3x3 conv to
  `growth` (padding 1), concatenated after its input (input channels first);
* transition: BN, ReLU, 1x1 conv halving the channels, 2x2/2 average pool;
* after the last block: BN (`norm5`, Keras `bn`) and ReLU (Keras `relu`).
  That ReLU's output is the feature map our head pools ("features").

All convolutions are bias-free and every BN has a scale. The one difference
of computation is BatchNorm's epsilon, Keras 1.001e-5 against torchvision's
1e-5: `variant` ('keras' | 'torchvision') selects it, and the converters
record the variant their weights were trained with.

Module names are torchvision's (`features/conv0`, `features/norm0`,
`features/denseblock1/denselayer1/conv1`, `features/transition1/norm`,
`features/norm5`); `cxr_jax.weights.densenet` maps Keras' `conv2_block1_1_conv`
names onto them.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from cxr_jax.models.common import (Backbone, Layer, grid_geometry, lookup,
                                   max_pool)

# depth -> layers per dense block (torchvision's block_config).
BLOCK_CONFIGS = {121: (6, 12, 24, 16), 169: (6, 12, 32, 32),
                 201: (6, 12, 48, 32)}
GROWTH_RATE = 32
NUM_INIT_FEATURES = 64
BN_SIZE = 4  # bottleneck width = BN_SIZE * GROWTH_RATE
# BatchNorm epsilon by variant: the statistics were estimated with these.
BN_EPSILONS = {"keras": 1.001e-5, "torchvision": 1e-5}
BN_MOMENTUM = 0.99  # Keras' default; PyTorch's momentum=0.1 is Flax's 0.9

# The smallest input that leaves a 1x1 map (torchvision's `min_size`).
MIN_INPUT_SIZE = 29
FEATURE_MAP = "features"


def feature_grid(size: int) -> tuple[int, float, float]:
  """(cells, offset, stride) of the final map for `size`-px inputs: conv0
  (7/2, pad 3), pool0 (3/2, pad 1) and the three 2x2/2 transition pools."""
  layers = [(7, 2, 3), (3, 2, 1)] + [(2, 2, "VALID")] * 3
  return grid_geometry(size, layers)


class _Norm(Layer):
  """Shared BatchNorm settings of every DenseNet module."""

  variant: str = "keras"

  def settings(self) -> dict[str, Any]:
    return dict(super().settings(), variant=self.variant)

  def norm(self, name: str, train: bool):
    return self.batch_norm(train, lookup(BN_EPSILONS, self.variant), name)

  def conv(self, features: int, kernel: int, name: str, strides: int = 1,
           padding: int = 0):
    return nn.Conv(features, (kernel, kernel), strides=(strides, strides),
                   padding=((padding, padding), (padding, padding)),
                   use_bias=False, dtype=self.dtype, name=name)


class DenseLayer(_Norm):
  """BN-ReLU-Conv1x1-BN-ReLU-Conv3x3; returns only the `growth` new maps."""

  growth_rate: int = GROWTH_RATE

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.relu(self.norm("norm1", train)(x))
    x = self.conv(BN_SIZE * self.growth_rate, 1, "conv1")(x)
    x = nn.relu(self.norm("norm2", train)(x))
    return self.conv(self.growth_rate, 3, "conv2", padding=1)(x)


class DenseBlock(_Norm):
  """`num_layers` dense layers, each seeing every earlier map."""

  num_layers: int = 6
  growth_rate: int = GROWTH_RATE

  @nn.compact
  def __call__(self, x, train: bool):
    for i in range(self.num_layers):
      new = DenseLayer(growth_rate=self.growth_rate, name=f"denselayer{i + 1}",
                       **self.settings())(x, train)
      x = jnp.concatenate([x, new], axis=-1)
    return x


class Transition(_Norm):
  """BN-ReLU-Conv1x1 (halves the channels) and a 2x2/2 average pool."""

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.relu(self.norm("norm", train)(x))
    x = self.conv(x.shape[-1] // 2, 1, "conv")(x)
    return nn.avg_pool(x, (2, 2), strides=(2, 2), padding="VALID")


class DenseNetFeatures(_Norm):
  """torchvision's `features` Sequential, plus the ReLU its forward applies
  after norm5."""

  block_config: tuple[int, ...] = BLOCK_CONFIGS[121]
  growth_rate: int = GROWTH_RATE

  @nn.compact
  def __call__(self, x, train: bool):
    common = self.settings()
    x = self.conv(NUM_INIT_FEATURES, 7, "conv0", strides=2, padding=3)(x)
    x = nn.relu(self.norm("norm0", train)(x))
    x = max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))
    for b, num_layers in enumerate(self.block_config):
      x = DenseBlock(num_layers=num_layers, growth_rate=self.growth_rate,
                     name=f"denseblock{b + 1}", **common)(x, train)
      if b != len(self.block_config) - 1:
        x = Transition(name=f"transition{b + 1}", **common)(x, train)
    return nn.relu(self.norm("norm5", train)(x))


class DenseNet(Backbone):
  """DenseNet-BC (121, 169 or 201) with a `num_classes`-way linear head.

  Attributes:
    depth: 121, 169 or 201.
    variant: 'keras' (BN epsilon 1.001e-5) or 'torchvision' (1e-5); what
      the weights were trained with.
    input_norm: what the weights expect of the [-1, 1] input; both Keras
      ('torch' preprocessing mode) and torchvision use ImageNet mean and std.
    bn_momentum: Flax's meaning (weight of the old running value).
    dropout_rate: 0.0 as upstream: neither torchvision's DenseNet nor
      Keras' has dropout before its classifier.

  `apply(variables, x, train=False, return_features=True)` returns
  `(logits, out)` with the final map (after norm5 and its ReLU) under
  "features" and models.common's 'feature_map', 'class_maps', 'pooled'.
  """

  depth: int = 121
  variant: str = "keras"
  bn_momentum: float = BN_MOMENTUM
  input_norm: str = "torch"

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False):
    blocks = lookup(BLOCK_CONFIGS, self.depth, "DenseNet depth")
    lookup(BN_EPSILONS, self.variant, "DenseNet variant")  # fail before work
    x = self.model_input(x, MIN_INPUT_SIZE, "DenseNet")
    x = DenseNetFeatures(block_config=blocks, name="features",
                         **self.layer_settings(variant=self.variant))(x, train)
    return self.outputs(x, {FEATURE_MAP: x}, train, return_features)

  def feature_grid(self, size: int) -> tuple[int, float, float]:
    """The CAM grid for `size`-px inputs (see `feature_grid`)."""
    return feature_grid(size)


MODELS = {f"densenet{d}": (DenseNet, {"depth": d}) for d in BLOCK_CONFIGS}
