"""DenseNet-121/169/201 parity: keras.applications and torchvision.

`KERAS_REFERENCES` are the Keras rows: the application (its own top is
global average pooling + 'predictions', like our head), the feature layer
`relu` (after the final `bn`) and Keras' 'densenet' preprocessing. The
builder gives 'predictions' a random bias, which Keras initialises to zero.

`CHECKS[model]` runs both proofs, the two Keras layouts
(`cxr_jax.parity.keras.keras_parity`) and the torchvision reference
(`cxr_jax.parity.torch_densenet`), and returns one dict of max abs errors:
'legacy@<size>/...', 'keras3@<size>/...' and 'torchvision@<size>/...'
(without torch, the Keras ones alone; see `keras.keras_and_torch_parity`).
"""

from __future__ import annotations

import functools
from typing import Callable

import numpy as np

from cxr_jax.parity import keras, torch_densenet


def build_application(application: str, keras_module, size: int,
                      num_classes: int):
  """`keras.applications.<application>` with logits out and a random bias
  on 'predictions'."""
  net = getattr(keras_module.applications, application)(
      weights=None, input_shape=(size, size, 3), classes=num_classes,
      classifier_activation=None)
  bias = net.get_layer("predictions").bias
  rng = np.random.default_rng(size)
  bias.assign(rng.normal(0.0, 0.2, bias.shape).astype(np.float32))
  return net


KERAS_REFERENCES = {
    f"densenet{d}": keras.KerasReference(
        f"DenseNet{d}", "relu", "densenet",
        functools.partial(build_application, f"DenseNet{d}"))
    for d in (121, 169, 201)}


CHECKS: dict[str, Callable[..., dict[str, float]]] = keras.checks_with_torch(
    KERAS_REFERENCES, torch_densenet)
