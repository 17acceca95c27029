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

Module names are TF-slim's end points (`Mixed_3a` ... `Mixed_7a`), and inside
a block timm's (`branch1_0` for `branch1.0`; a pool branch's conv, timm's
`branch3.1`, is `branch_pool`). The runs of equal blocks (`Mixed_5b-e`,
`Mixed_6b-h`, `Mixed_7b-d`) are scanned, their variables stacked under their
block's name (`InceptionA/branch0/conv/kernel` holds `Mixed_5b`'s at index
0; see `STAGES`). `cxr_jax.weights.inception_v4` maps timm's
`features.N...` keys onto them explicitly.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn

from cxr_jax.models.common import (InceptionBackbone, InceptionBlock, Unit,
                                   inception_a, inception_b, inception_c,
                                   inception_grid, max_pool_3x3, reduction_a,
                                   reduction_b, repeat, slim_stem)

BN_EPSILON = 1e-3
# PyTorch's momentum=0.1 (the new value's weight) is Flax's 0.9.
BN_MOMENTUM = 0.9
# The VALID stem and the three VALID reductions leave a 1x1 map at 75 px.
MIN_INPUT_SIZE = 75
FEATURE_MAP = "features"  # timm's forward_features: 1536 channels


class _Block(InceptionBlock):
  """timm's ConvNormAct, pretrainedmodels' BasicConv2d: conv (no bias) ->
  BatchNorm (eps 1e-3, with PyTorch's gamma) -> ReLU."""

  bn_epsilon = BN_EPSILON
  bn_scale = True
  bn_momentum: float = BN_MOMENTUM


class Mixed3a(_Block):
  """64 -> 160 channels, stride 2: max pool beside a 3x3/2 conv."""

  def branches(self):
    return ([max_pool_3x3], [Unit(96, (3, 3), "conv", (2, 2), "VALID")])


class Mixed4a(_Block):
  """160 -> 192 channels; both branches end in a VALID 3x3 (-2 px)."""

  def branches(self):
    return (
        [Unit(64, (1, 1), "branch0_0"),
         Unit(96, (3, 3), "branch0_1", padding="VALID")],
        [Unit(64, (1, 1), "branch1_0"), Unit(64, (1, 7), "branch1_1"),
         Unit(64, (7, 1), "branch1_2"),
         Unit(96, (3, 3), "branch1_3", padding="VALID")],
    )


class Mixed5a(_Block):
  """192 -> 384 channels, stride 2: a 3x3/2 conv beside a max pool."""

  def branches(self):
    return ([Unit(192, (3, 3), "conv", (2, 2), "VALID")], [max_pool_3x3])


class InceptionA(_Block):
  """35x35 block, 384 channels (Mixed_5b-e)."""

  def branches(self):
    return inception_a(self.avg_pool_3x3, 96, (64, 96), (64, 96, 96), 96)


class ReductionA(_Block):
  """35 -> 17, 384 -> 1024 channels (Mixed_6a)."""

  def branches(self):
    return reduction_a(k=192, l=224, m=256, n=384)


class InceptionB(_Block):
  """17x17 block, 1024 channels (Mixed_6b-h)."""

  def branches(self):
    return inception_b(self.avg_pool_3x3, 384, (192, 224, 256),
                       (192, 192, 224, 224, 256), 128)


class ReductionB(_Block):
  """17 -> 8, 1024 -> 1536 channels (Mixed_7a)."""

  def branches(self):
    return reduction_b((192, 192), (256, 256, 320, 320))


class InceptionC(_Block):
  """8x8 block, 1536 channels (Mixed_7b-d)."""

  def branches(self):
    return inception_c(self.avg_pool_3x3, 256, (384, 256),
                       (384, 448, 512, 256), 256, middle=((3, 1), (1, 3)))


# timm's features.0-2: the first three convolutions of Inception V3's stem.
STEM = slim_stem(("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"))
# The stages in order: (module name, block, the upstream's names of the
# blocks of a scanned group). A group of equal blocks runs as one scanned
# module (`repeat`) named after its block, its variables stacked in timm's
# order (`Mixed_5b` is `InceptionA`'s index 0).
STAGES: Sequence[tuple[str, type[_Block], tuple[str, ...]]] = (
    ("Mixed_3a", Mixed3a, ()), ("Mixed_4a", Mixed4a, ()),
    ("Mixed_5a", Mixed5a, ()),
    ("InceptionA", InceptionA, tuple(f"Mixed_5{c}" for c in "bcde")),
    ("Mixed_6a", ReductionA, ()),
    ("InceptionB", InceptionB, tuple(f"Mixed_6{c}" for c in "bcdefgh")),
    ("Mixed_7a", ReductionB, ()),
    ("InceptionC", InceptionC, tuple(f"Mixed_7{c}" for c in "bcd")),
)
REPEATED: dict[str, tuple[str, ...]] = {
    name: members for name, _, members in STAGES if members}
# Every block by the upstream's name, in order: timm's features.3 ...
# features.21.
BLOCKS: Sequence[tuple[str, type[_Block]]] = tuple(
    (member, block) for name, block, members in STAGES
    for member in members or (name,))


def feature_grid(size: int) -> tuple[int, float, float]:
  """(cells, offset, stride) of the final 1536-channel grid: the two VALID
  stem convs, Mixed_3a's stride 2, Mixed_4a's VALID 3x3 and the stride-2
  Mixed_5a, Mixed_6a and Mixed_7a move it (see `inception_grid`)."""
  return inception_grid(size)


class InceptionV4(InceptionBackbone):
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

  bn_momentum: float = BN_MOMENTUM
  # Trace every repeated block instead of scanning (see `common.repeat`):
  # the same variables and numbers, a longer compile and a faster step;
  # XLA's cost analysis needs it.
  unroll_blocks: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False):
    x = self.model_input(x, MIN_INPUT_SIZE, "InceptionV4")
    settings = self.layer_settings()
    x = _Block.stem(x, train, STEM, **settings)
    for name, block, members in STAGES:
      module = block(name=name, **settings)
      x = (repeat(module, x, train, len(members), self.unroll_blocks)
           if members else module(x, train))
    return self.outputs(x, {FEATURE_MAP: x}, train, return_features)

  def feature_grid(self, size: int) -> tuple[int, float, float]:
    """The final grid for `size`-px inputs (see `feature_grid`)."""
    return feature_grid(size)


MODELS = {"inception_v4": (InceptionV4, {})}
