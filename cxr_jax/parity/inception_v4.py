"""Inception V4 parity: the timm/pretrainedmodels reference in
`torch_inception_v4` (PyTorch, imported only when a check runs), random
weights and BatchNorm statistics, each source through its converter."""

from __future__ import annotations

from cxr_jax.parity.torch_inception_v4 import CHECKS, torch_parity

__all__ = ["CHECKS", "torch_parity"]
