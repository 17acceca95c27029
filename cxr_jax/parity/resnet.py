"""Parity of the ResNets with both upstreams, random weights.

* Keras: `keras.applications.ResNet50/101/152` (v1), whose `conv5_block3_out`
  is our `layer4`, preprocessed by `keras.applications.resnet`
  ('caffe' mode); `parity.keras.keras_parity` proves both Keras layouts.
  The random reference's residual branches are scaled down (see
  RESIDUAL_BRANCH_SCALE).
* torchvision: `parity.torch_resnet`'s line-for-line torchvision 0.29.1
  ResNet (v1.5), through a saved `.pth` state dict.

`CHECKS[model](sizes, batch, seed)` runs both and returns
{'<legacy|keras3|torchvision>@<size>/<logits|feature_map>': max abs error}.
The torchvision half needs torch; without it the check says so in its log
and returns the Keras errors alone.
"""

from __future__ import annotations

from typing import Callable

from cxr_jax.parity import keras, torch_resnet

# Each residual branch's last convolution (`_3_conv`) starts at this fraction
# of Keras' Glorot draw. BatchNorm with random, not measured, running
# statistics does not renormalise, so every block grows the residual stream
# by a fixed factor; over ResNet-152's 36 conv4 blocks that makes logits
# whose float32 rounding alone nears the 1e-4 bar. A smaller branch keeps
# them small, so the check measures the conversion, not rounding.
RESIDUAL_BRANCH_SCALE = 0.5


def scale_residual_branches(net) -> None:
  """Scales every `_3_conv` kernel of a Keras ResNet by
  RESIDUAL_BRANCH_SCALE, in place."""
  for layer in net.layers:
    if layer.name.endswith("_3_conv"):
      layer.kernel.assign(layer.kernel * RESIDUAL_BRANCH_SCALE)


def _application(name: str):
  """KerasReference.build: `keras.applications.<name>` with logits, its
  residual branches scaled (scale_residual_branches)."""
  def build(keras_module, size: int, num_classes: int):
    net = getattr(keras_module.applications, name)(
        weights=None, input_shape=(size, size, 3), classes=num_classes,
        classifier_activation=None)
    scale_residual_branches(net)
    return net
  return build


KERAS_REFERENCES = {
    f"resnet{depth}": keras.KerasReference(
        f"ResNet{depth}", "conv5_block3_out", "resnet",
        _application(f"ResNet{depth}"))
    for depth in (50, 101, 152)
}
CHECKS: dict[str, Callable[..., dict[str, float]]] = keras.checks_with_torch(
    KERAS_REFERENCES, torch_resnet)
