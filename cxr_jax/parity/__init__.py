"""Numerical parity of our backbones with reference implementations.

ImageNet weights cannot be downloaded everywhere, so every converter is proven
on a reference model with random weights: Keras 3 applications on the JAX
backend for the Keras families, torch modules written after the upstream
definitions for the others. Random BatchNorm moving statistics are essential:
left at 0/1 they would hide a swapped mean and variance, or a BN paired with
the wrong convolution.

`CHECKS[model](sizes, batch, seed)` runs one backbone's proof and returns
{'<source/layout>@<size>/<output>': max abs error}; `cxr-jax parity-check
--model NAME` prints it.
"""

from __future__ import annotations

from typing import Callable

from cxr_jax.parity import (bn_inception, densenet, inception_resnet_v2,
                            inception_v4, keras, resnet, vgg)
from cxr_jax.parity.common import max_abs_error, relative_error

# Each family's check proves every source it converts (Keras layouts,
# torchvision, timm, pretrainedmodels).
CHECKS: dict[str, Callable[..., dict[str, float]]] = {
    **keras.CHECKS, **resnet.CHECKS, **vgg.CHECKS, **densenet.CHECKS,
    **bn_inception.CHECKS, **inception_v4.CHECKS, **inception_resnet_v2.CHECKS,
}
# Models with a keras.applications counterpart (benchmarks/forward.py).
KERAS_REFERENCES: dict[str, keras.KerasReference] = {
    **keras.KERAS_REFERENCES, **resnet.KERAS_REFERENCES,
    **vgg.KERAS_REFERENCES, **densenet.KERAS_REFERENCES,
    **inception_resnet_v2.REFERENCES,
}


def run(model: str, sizes=(299, 224), batch: int = 2, seed: int = 0
        ) -> dict[str, float]:
  if model not in CHECKS:
    raise ValueError(f"no parity check for model {model!r} (--model); "
                     f"choose one of {sorted(CHECKS)}")
  return CHECKS[model](sizes=tuple(sizes), batch=batch, seed=seed)


__all__ = ["CHECKS", "KERAS_REFERENCES", "run", "max_abs_error",
           "relative_error"]
