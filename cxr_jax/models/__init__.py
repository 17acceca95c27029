"""Backbones behind one interface (see `cxr_jax.models.common`), and the
registry that builds any of them from a config.

`build(name, **kwargs)` is the one factory: the training step, evaluation,
localization, predict and the demo never name a backbone. A config selects
one with `config.model_name` and passes `config.model` as keyword arguments
(big_vision's way).
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from cxr_jax.models import (bn_inception, densenet, inception_resnet_v2,
                            inception_v3, inception_v4, resnet, vgg)
from cxr_jax.models.common import count_parameters
from cxr_jax.models.inception_v3 import (FEATURE_MAP, MIN_INPUT_SIZE,
                                         InceptionV3)

# name -> (constructor, fixed keyword arguments). Depths of one family are
# rows with different fixed arguments.
MODELS: dict[str, tuple[Callable[..., nn.Module], dict[str, Any]]] = {
    "inception_v3": (InceptionV3, {}),
    **resnet.MODELS, **vgg.MODELS, **densenet.MODELS,
    **bn_inception.MODELS, **inception_v4.MODELS,
    **inception_resnet_v2.MODELS,
}


class ModelConfigError(ValueError):
  """A model name or option the registry cannot build; names the key."""


def build(name: str, **kwargs) -> nn.Module:
  """The backbone `name` with `kwargs` (num_classes, dtype, bn_axis_name, ...
  and family options). An unknown name or option is a ModelConfigError that
  names it."""
  if name not in MODELS:
    raise ModelConfigError(f"unknown model {name!r} (config.model_name); "
                           f"choose one of {sorted(MODELS)}")
  constructor, fixed = MODELS[name]
  fields = set(getattr(constructor, "__dataclass_fields__", {}))
  unknown = sorted(k for k in kwargs if k not in fields)
  if unknown:
    raise ModelConfigError(
        f"model {name!r} has no option {', '.join(unknown)} "
        f"(config.model.{unknown[0]}); its options are "
        f"{sorted(f for f in fields if f not in ('parent', 'name'))}")
  return constructor(**{**fixed, **kwargs})


def scans_blocks(name: str) -> bool:
  """Whether backbone `name` scans its repeated blocks
  (`models.common.repeat`; such a family has `unroll_blocks`)."""
  constructor, _ = MODELS[name]
  return "unroll_blocks" in getattr(constructor, "__dataclass_fields__", {})


def cost_analysis_options(name: str) -> dict[str, Any]:
  """The options of backbone `name` under which XLA's cost analysis counts
  every layer: it counts a loop's body once, so a family that scans its
  repeated blocks traces them unrolled (`unroll_blocks`)."""
  return {"unroll_blocks": True} if scans_blocks(name) else {}


# Flat keys of configs written before `config.model` existed, and where
# they live now. `upgrade_config` moves them, so older runs still restore.
_LEGACY_MODEL_KEYS = ("dtype", "dropout_rate", "bn_momentum", "head_pooling",
                      "lse_r", "output_stride", "depth_multiplier",
                      "conv_init")


def min_input_size(name: str) -> int | None:
  """The smallest input side backbone `name` accepts: its family module's
  MIN_INPUT_SIZE, which the model's input check enforces. None for a
  backbone registered from elsewhere that declares none (a user's own
  network): its own forward pass is then the only check."""
  if name not in MODELS:
    raise ModelConfigError(f"config.model_name={name!r} is not a known "
                           f"backbone; choose one of {sorted(MODELS)}")
  module = sys.modules.get(MODELS[name][0].__module__)
  return getattr(module, "MIN_INPUT_SIZE", None)


def upgrade_config(config: ml_collections.ConfigDict
                   ) -> ml_collections.ConfigDict:
  """A config of an older run (flat model keys, `model='inception_v3'` or
  'inception_v3_transition') in today's shape; today's configs unchanged."""
  if not isinstance(config.get("model"), str):
    return config
  config = ml_collections.ConfigDict(config.to_dict())
  with config.unlocked():
    legacy = config.model
    model = {k: config[k] for k in _LEGACY_MODEL_KEYS if k in config}
    for k in model:
      del config[k]
    if legacy == "inception_v3_transition":
      model["transition_channels"] = 1024
    config.model_name = "inception_v3"
    config.model = ml_collections.ConfigDict(model)
  return config


def from_config(config: ml_collections.ConfigDict,
                bn_axis_name: str | None = None) -> nn.Module:
  """The run's backbone: `config.model_name` built with `config.model`.

  BatchNorm synchronises over `bn_axis_name` in training when
  `config.sync_batch_stats`. Everything the model needs is in the config
  (converted weights' architecture facts are copied into `config.model` when
  training starts), so a checkpoint rebuilds its model alone.
  """
  kwargs = dict(config.model)
  kwargs["dtype"] = jnp.dtype(kwargs.get("dtype", "float32"))
  return build(config.model_name, num_classes=config.num_outputs,
               bn_axis_name=bn_axis_name if config.sync_batch_stats else None,
               **kwargs)


__all__ = ["from_config", "upgrade_config", "MODELS", "build", "ModelConfigError", "InceptionV3",
           "cost_analysis_options", "scans_blocks",
           "FEATURE_MAP", "MIN_INPUT_SIZE", "count_parameters", "inception_v3"]
