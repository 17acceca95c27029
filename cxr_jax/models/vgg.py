"""VGG16 and VGG19 (Simonyan & Zisserman 2015), convolutional part, in Flax.

Layer for layer the convolutional part of `keras.applications.VGG16/19` and
torchvision's `vgg16/vgg19` (configurations D and E): 3x3 convolutions with
bias, padding 1 (Keras 'same') and ReLU, and a 2x2/2 max pool closing each of
the five blocks. Keras and torchvision compute the same function; only their
input preprocessing differs (`input_norm`: Keras 'caffe', BGR with the mean
subtracted; torchvision 'torch', ImageNet mean and std).

The feature map ("features") is block5_pool's output, the map Keras'
`include_top=False, pooling='avg'` averages: 7x7 at 224 px, 9x9 at 299. Our
head pools it and applies one linear layer. The original fc6/fc7 (4096-wide
layers on a flattened 7x7 map) fix the input at 224 px and leave no spatial
map for CAM, so the converters skip them (and the 1000-way layer on fc7) and
log each by name.

Module names are Keras' (`block1_conv1` ... `block5_conv3`): torchvision's
(`features.0`, `features.2`, ...) are positions in a Sequential and name
nothing. VGG has no BatchNorm: `bn_axis_name` and `bn_momentum` exist for the
common interface and change nothing.
"""

from __future__ import annotations

import flax.linen as nn

from cxr_jax.models.common import Backbone, grid_geometry, lookup, max_pool

# depth -> convolutions per block; block b has WIDTHS[b] channels.
BLOCK_CONFIGS = {16: (2, 2, 3, 3, 3), 19: (2, 2, 4, 4, 4)}
WIDTHS = (64, 128, 256, 512, 512)
# Five 2x2/2 pools: 32 px is the smallest input that leaves a 1x1 map.
MIN_INPUT_SIZE = 32
FEATURE_MAP = "features"


def conv_names(depth: int) -> list[str]:
  """Keras' convolution names in network order, `block1_conv1` first."""
  return [f"block{b + 1}_conv{i + 1}"
          for b, n in enumerate(BLOCK_CONFIGS[depth]) for i in range(n)]


def feature_grid(size: int) -> tuple[int, float, float]:
  """(cells, offset, stride) of block5_pool for `size`-px inputs. The
  padded stride-1 convolutions keep cell centres; only the pools move them."""
  return grid_geometry(size, [(2, 2, "VALID")] * 5)


class VGG(Backbone):
  """VGG16/19's convolutions with a `num_classes`-way linear head on the
  pooled block5_pool map.

  Attributes:
    depth: 16 or 19.
    input_norm: 'caffe' for Keras weights, 'torch' for torchvision weights.
    bn_axis_name, bn_momentum: accepted for the common interface; VGG has no
      BatchNorm.

  `apply(variables, x, train=False, return_features=True)` returns
  `(logits, out)` with block5_pool's output under "features" and
  models.common's 'feature_map', 'class_maps', 'pooled'.
  """

  depth: int = 16
  bn_momentum: float = 0.99
  input_norm: str = "caffe"

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False):
    blocks = lookup(BLOCK_CONFIGS, self.depth, "VGG depth")
    x = self.model_input(x, MIN_INPUT_SIZE, "VGG")
    for b, n in enumerate(blocks):
      for i in range(n):
        x = nn.Conv(WIDTHS[b], (3, 3), padding=((1, 1), (1, 1)),
                    dtype=self.dtype, name=f"block{b + 1}_conv{i + 1}")(x)
        x = nn.relu(x)
      x = max_pool(x, (2, 2), (2, 2), "VALID")
    return self.outputs(x, {FEATURE_MAP: x}, train, return_features)

  def feature_grid(self, size: int) -> tuple[int, float, float]:
    """The CAM grid for `size`-px inputs (see `feature_grid`)."""
    return feature_grid(size)


MODELS = {f"vgg{d}": (VGG, {"depth": d}) for d in BLOCK_CONFIGS}
