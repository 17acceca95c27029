"""VGG16/19 parity: keras.applications and torchvision.

Keras' own top (flatten, fc1, fc2 on a 7x7 map) fixes the input at 224 px,
so the Keras reference is `VGG16/19(include_top=False, pooling='avg')` with
one `Dense(classes, name='predictions')` on the pooled 512 channels: our head,
so logits compare too. The feature layer is `block5_pool` (what
`pooling='avg'` averages) and preprocessing Keras' 'caffe' mode. The builder
gives every layer random biases, which Keras initialises to zero.

`CHECKS[model]` runs both proofs, the two Keras layouts
(`cxr_jax.parity.keras.keras_parity`) and the torchvision reference
(`cxr_jax.parity.torch_vgg`: features, a 1x1 average pool and our own
linear), and returns one dict of max abs errors: 'legacy@<size>/...',
'keras3@<size>/...' and 'torchvision@<size>/...' (without torch, the Keras
ones alone; see `keras.keras_and_torch_parity`).
"""

from __future__ import annotations

import functools
from typing import Callable

import numpy as np

from cxr_jax.parity import keras, torch_vgg


def build_pooled(application: str, keras_module, size: int, num_classes: int):
  """`keras.applications.<application>(include_top=False, pooling='avg')` and
  a 'predictions' Dense on top (logits), with random biases."""
  base = getattr(keras_module.applications, application)(
      weights=None, include_top=False, pooling="avg",
      input_shape=(size, size, 3))
  logits = keras_module.layers.Dense(num_classes, name="predictions")(
      base.output)
  # One flat functional model, so both weight layouts list the application's
  # layers themselves (a nested model would be one opaque layer).
  net = keras_module.Model(base.input, logits, name=application.lower())
  rng = np.random.default_rng(size)
  for layer in net.layers:
    if getattr(layer, "bias", None) is not None:
      layer.bias.assign(rng.normal(0.0, 0.1, layer.bias.shape).astype(
          np.float32))
  return net


KERAS_REFERENCES = {
    f"vgg{d}": keras.KerasReference(
        f"VGG{d}", "block5_pool", f"vgg{d}",
        functools.partial(build_pooled, f"VGG{d}"))
    for d in (16, 19)}


CHECKS: dict[str, Callable[..., dict[str, float]]] = keras.checks_with_torch(
    KERAS_REFERENCES, torch_vgg)
