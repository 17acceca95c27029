"""BN-Inception parity: pretrainedmodels' Caffe BN-Inception.

`CHECKS['bn_inception']` builds `parity.torch_bn_inception`'s
line-for-line pretrainedmodels 0.7.4 `BNInception` with random weights and
random BatchNorm statistics, saves it as a `.pth`, converts it through
`cxr_jax.weights.bn_inception` and compares logits and the inception_5b map:
{'pretrainedmodels@<size>/<logits|feature_map>': max abs error}.

The Caffe net does not compute 299-px inputs (inception_3c's branches
disagree; see `models.bn_inception`), so a 299 request is checked at 294,
the nearest size below that it computes, and the key says 294.

TF-slim's variant has no converter and so no check here: there is no
TensorFlow in this project to read its checkpoints or build its graph.
Without torch the check says so in its log and returns nothing.
"""

from __future__ import annotations

import functools
from typing import Callable

from cxr_jax.parity import torch_bn_inception
from cxr_jax.parity.common import torch_available


def parity(model: str = "bn_inception", sizes=(299, 224), batch: int = 2,
           seed: int = 0) -> dict[str, float]:
  if not torch_available(f"{model}'s pretrainedmodels parity"):
    return {}
  return torch_bn_inception.torch_parity(model, sizes, batch, seed)


CHECKS: dict[str, Callable[..., dict[str, float]]] = {
    "bn_inception": functools.partial(parity, "bn_inception")}
