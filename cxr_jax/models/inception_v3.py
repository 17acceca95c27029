"""InceptionV3 in Flax linen, layer for layer the Keras application.

Architecture follows `keras.applications.InceptionV3` (itself TF-slim and
Szegedy et al. 2016, "Rethinking the Inception Architecture"), so that Keras'
ImageNet weights load without any numerical change:

* every convolution has no bias and is followed by BatchNorm with epsilon=1e-3
  and no scale (gamma): the ReLU after it makes a scale redundant;
* the stem convolutions and the stride-2 reductions are 'VALID'; convolutions
  inside the Inception blocks are 'SAME';
* the 3x3 average pools inside blocks exclude the padding from the mean
  (`pool_include_padding=False`). torchvision's port counts the padding, so a
  model converted from torchvision sets it True to compute the same function.

Module names follow torchvision's (`Mixed_5b/branch5x5_1`, ...), because those
are the names researchers already know; `cxr_jax.weights` maps Keras' anonymous
`conv2d_N` layers onto them explicitly.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from cxr_jax.models.common import (ConvBN, InceptionBackbone, InceptionBlock,
                                   Naming, Unit, inception_a, inception_b,
                                   inception_c, inception_grid, reduction_a,
                                   reduction_b, slim_stem)

# Keras' BatchNormalization defaults: the ImageNet statistics were produced with
# these, and Flax's `momentum` has the same meaning as Keras' (the weight of the
# old running value), unlike PyTorch's.
BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99
# TF-slim's inception_v3 floor for thinned layers (`min_depth`).
MIN_DEPTH = 16


def scaled_depth(features: int, depth_multiplier: float) -> int:
  """TF-slim's `depth(d) = max(int(d * depth_multiplier), min_depth)`.

  A multiplier of 1.0 is the published network (and the only one ImageNet
  weights fit); smaller ones thin every convolution, which keeps the
  architecture and its 32x stride, so a CPU can afford 299-px inputs and
  their 8x8 Mixed_7c map.
  """
  if depth_multiplier == 1.0:
    return features
  if depth_multiplier <= 0:
    raise ValueError(f"depth_multiplier must be > 0, got {depth_multiplier}")
  return max(int(features * depth_multiplier), MIN_DEPTH)


CONV_INITS = ("lecun_normal", "delta")


def delta_init(base=nn.initializers.lecun_normal()):
  """Delta initialisation: the centre tap gets `base` with the fan-in of one
  tap and every other tap starts at zero (the delta-orthogonal scheme of
  Xiao et al. 2018, with a lecun-normal centre instead of an orthogonal one).

  Each convolution then starts as a 1x1 map of its input, so a network
  trained from scratch starts with the receptive field of its strides and
  pools alone, and grows spatial extent only where the gradient asks for it.
  At 299 px half the input-gradient mass of a Mixed_7c cell lies within
  ~35 px of it at this init and within ~71 px at the default one (measured,
  benchmarks/RESULTS.md): that spread is what blurs class activation maps
  trained from scratch.
  """
  def init(key, shape, dtype=jnp.float32):
    kh, kw = shape[0], shape[1]
    centre = base(key, (1, 1, *shape[2:]), dtype)
    return jnp.zeros(shape, dtype).at[kh // 2, kw // 2].set(centre[0, 0])
  return init


def _kernel_init(name: str):
  if name == "lecun_normal":
    return nn.initializers.lecun_normal()
  if name == "delta":
    return delta_init()
  raise ValueError(f"conv_init must be one of {CONV_INITS}, got {name!r}")


class _Block(InceptionBlock):
  """Keras' `conv2d_bn`: conv (no bias) -> BatchNorm (epsilon 1e-3, no
  scale) -> ReLU, thinned by `depth_multiplier`."""

  bn_epsilon = BN_EPSILON
  bn_scale = False
  pool_include_padding: bool = False
  depth_multiplier: float = 1.0
  conv_init: str = "lecun_normal"

  @classmethod
  def conv_bn(cls, features: int, kernel: tuple[int, int],
              strides: tuple[int, int] = (1, 1), padding: str = "SAME",
              depth_multiplier: float = 1.0, **kwargs) -> ConvBN:
    """Thinned by `depth_multiplier` (see scaled_depth)."""
    return super().conv_bn(scaled_depth(features, depth_multiplier), kernel,
                           strides, padding, **kwargs)

  def conv(self, unit: Unit, **options) -> ConvBN:
    return super().conv(unit, kernel_init=_kernel_init(self.conv_init),
                        depth_multiplier=self.depth_multiplier, **options)

  def avg_pool_3x3(self, x):
    """Counts the padding when `pool_include_padding` (torchvision's)."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding="SAME",
                       count_include_pad=self.pool_include_padding)


# torchvision's names: a branch is called by what it computes, and its units
# count from 1 (`branch5x5_1`); the blocks' shapes are models.common's.
def _torchvision(*labels: str) -> Naming:
  return Naming(labels, first=1)


class InceptionA(_Block):
  """35x35 block (Keras mixed0-2, torchvision Mixed_5b-d)."""

  pool_features: int = 32

  def branches(self):
    return inception_a(
        self.avg_pool_3x3, 64, (48, 64), (64, 96, 96), self.pool_features,
        kernel=(5, 5), names=_torchvision("branch1x1", "branch5x5",
                                          "branch3x3dbl", "branch_pool"))


class InceptionB(_Block):
  """35 -> 17 reduction (Keras mixed3, torchvision Mixed_6a)."""

  def branches(self):
    return reduction_a(k=64, l=96, m=96, n=384,
                       names=_torchvision("branch3x3", "branch3x3dbl"))


class InceptionC(_Block):
  """17x17 block with factorised 7x7 convolutions (mixed4-7, Mixed_6b-e)."""

  channels_7x7: int = 128

  def branches(self):
    c7 = self.channels_7x7
    return inception_b(
        self.avg_pool_3x3, 192, (c7, c7, 192), (c7, c7, c7, c7, 192), 192,
        names=_torchvision("branch1x1", "branch7x7", "branch7x7dbl",
                           "branch_pool"))


class InceptionD(_Block):
  """17 -> 8 reduction (Keras mixed8, torchvision Mixed_7a); with stride 1
  (output_stride 16) it only trims the border, 17 -> 15."""

  stride: int = 2

  def branches(self):
    return reduction_b((192, 320), (192, 192, 192, 192),
                       names=_torchvision("branch3x3", "branch7x7x3"),
                       stride=self.stride)


class InceptionE(_Block):
  """8x8 block with expanded filter banks (mixed9-10, Mixed_7b-c)."""

  def branches(self):
    return inception_c(
        self.avg_pool_3x3, 320, (384, 384), (448, 384, 384), 192,
        names=_torchvision("branch1x1", "branch3x3", "branch3x3dbl",
                           "branch_pool"))


class InceptionAux(_Block):
  """torchvision's auxiliary classifier on Mixed_6e (off by default).

  It needs a Mixed_6e map of at least 17x17, i.e. inputs of about 299 px.
  """

  num_classes: int = 1000

  @nn.compact
  def __call__(self, x, train: bool):
    if x.shape[1] < 17 or x.shape[2] < 17:
      raise ValueError(
          f"the auxiliary logits branch needs a Mixed_6e map of at least 17x17 "
          f"(inputs of about 299 px); got {x.shape[1]}x{x.shape[2]}")
    x = nn.avg_pool(x, (5, 5), strides=(3, 3), padding="VALID")
    x = self.run(x, train, [Unit(128, (1, 1), "conv0"),
                            Unit(768, (5, 5), "conv1", padding="VALID")])
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x)


# (name, block class, extra attributes) in the order the network applies them.
# The same order is Keras' layer-creation order, which the converter relies on.
BLOCKS: Sequence[tuple[str, type[_Block], dict[str, Any]]] = (
    ("Mixed_5b", InceptionA, {"pool_features": 32}),
    ("Mixed_5c", InceptionA, {"pool_features": 64}),
    ("Mixed_5d", InceptionA, {"pool_features": 64}),
    ("Mixed_6a", InceptionB, {}),
    ("Mixed_6b", InceptionC, {"channels_7x7": 128}),
    ("Mixed_6c", InceptionC, {"channels_7x7": 160}),
    ("Mixed_6d", InceptionC, {"channels_7x7": 160}),
    ("Mixed_6e", InceptionC, {"channels_7x7": 192}),
    ("Mixed_7a", InceptionD, {}),
    ("Mixed_7b", InceptionE, {}),
    ("Mixed_7c", InceptionE, {}),
)
# The stem, and the convolutions a 3x3/2 max pool follows.
STEM = slim_stem(("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3",
                  "Conv2d_3b_1x1", "Conv2d_4a_3x3"))
STEM_POOLS = ("Conv2d_2b_3x3", "Conv2d_4a_3x3")
MIN_INPUT_SIZE = 75


def _mixed_7a_stride(output_stride: int) -> int:
  if output_stride not in (16, 32):
    raise ValueError(f"output_stride must be 16 or 32, got {output_stride}")
  return output_stride // 16


def feature_grid(size: int, output_stride: int = 32
                 ) -> tuple[int, float, float]:
  """(cells, offset, stride) of the Mixed_7c grid for `size`-px inputs.

  Cell i's receptive field is centred at pixel coordinate offset + stride*i
  (pixel k spans [k, k+1)). Because the stem is VALID, that centre is not
  (i + 0.5) * size / cells: at 299 px it is 37.5 + 32 i, while plain
  resizing puts it at 18.7 + 37.4 i, up to 19 px off. CAMs are placed with
  this geometry.
  """
  return inception_grid(size, _mixed_7a_stride(output_stride))


FEATURE_MAP = "Mixed_7c"  # the last convolutional map, 2048 channels, for CAM


class InceptionV3(InceptionBackbone):
  """InceptionV3 with a `num_classes`-way linear head (logits).

  Attributes:
    num_classes: outputs of the head. DeepCXray uses 15: the 14 diseases of
      `cxr_jax.labels.DISEASES` and the auxiliary "normal" output.
    dropout_rate: dropout before the head in training (Keras: none, 0.0;
      torchvision: 0.5).
    dtype: computation dtype (e.g. bfloat16); parameters stay float32.
    aux_logits: add torchvision's auxiliary classifier on Mixed_6e.
    pool_include_padding: count padding in the block average pools, as
      torchvision does; False is Keras/TF-slim.
    bn_axis_name: when set, training-mode BatchNorm averages its batch
      statistics over this named axis (under shard_map/pmap), so that N devices
      normalise exactly as one device with the global batch would.
    depth_multiplier: TF-slim's channel multiplier; 1.0 is the published
      network.

  Call `model.apply(variables, x, train=False)` with NHWC inputs in [-1, 1].
  It returns logits; with `return_features=True` it returns `(logits, out)`
  with out's 'class_maps', 'feature_map' and 'pooled' (models.common) plus
  "Mixed_7c" (and "transition", "aux_logits" when the model has them).
  """

  aux_logits: bool = False
  pool_include_padding: bool = False
  # Wang et al. 2017's transition layer (Table 2's CEL(tran.) row): a 1x1 conv
  # to this many channels, BN, ReLU, then log-sum-exp pooling with `lse_r`.
  transition_channels: int = 0
  # Keras' 0.99. A short run from scratch wants less: the running statistics
  # that inference uses lag the weights by ~1/(1 - momentum) steps.
  bn_momentum: float = BN_MOMENTUM
  # TF-slim's depth_multiplier: thins every convolution (see scaled_depth).
  depth_multiplier: float = 1.0
  # 32 is InceptionV3. 16 drops Mixed_7a's stride (as DeepLab does for
  # dense prediction): Mixed_7b/c and the CAM run on a 15x15 grid at 299 px,
  # and their 3x3 mixing spreads a finding over half as many pixels.
  output_stride: int = 32
  # How convolutions start when trained from scratch ('lecun_normal', Flax's
  # default, or 'delta'; see delta_init). Loaded weights replace either.
  conv_init: str = "lecun_normal"

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False):
    x = self.model_input(x, MIN_INPUT_SIZE, "InceptionV3")
    if self.transition_channels and self.head_pooling != "avg":
      raise ValueError("the transition layer pools its own map (LSE); "
                       "head_pooling must stay 'avg' with it")
    # The stem and transition units are the blocks' (see _Block.conv).
    units = self.layer_settings(kernel_init=_kernel_init(self.conv_init))
    blocks = self.layer_settings(
        conv_init=self.conv_init, depth_multiplier=self.depth_multiplier,
        pool_include_padding=self.pool_include_padding)
    x = _Block.stem(x, train, STEM, pool_after=STEM_POOLS,
                    depth_multiplier=self.depth_multiplier, **units)
    features = {}
    for name, block, attrs in BLOCKS:
      if name == "Mixed_7a":
        attrs = dict(attrs, stride=_mixed_7a_stride(self.output_stride))
      x = block(name=name, **attrs, **blocks)(x, train)
      if name == "Mixed_6e" and self.aux_logits:
        features["aux_logits"] = InceptionAux(
            num_classes=self.num_classes, name="AuxLogits", **blocks)(x, train)
    features[FEATURE_MAP] = x
    pooling = self.head_pooling
    if self.transition_channels:
      x = _Block.conv_bn(self.transition_channels, (1, 1), name="transition",
                         **units)(x, train)
      features["transition"] = x
      pooling = "lse_features"
    return self.outputs(x, features, train, return_features, pooling)

  def feature_grid(self, size: int) -> tuple[int, float, float]:
    """The CAM grid for `size`-px inputs (see `feature_grid`)."""
    return feature_grid(size, self.output_stride)
