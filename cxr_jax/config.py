"""Loading `configs/<experiment>.py` files and `--config.KEY=VALUE` overrides."""

from __future__ import annotations

import ast
import importlib.util
import math
import os
import sys
from typing import Any, Callable, Sequence

import ml_collections

from cxr_jax import models


class ConfigError(ValueError):
  """A config value or override that cannot be used; names the key as the
  `--config.KEY` flag that sets it."""


def load_config(path: str, overrides: Sequence[str] = ()
                ) -> ml_collections.ConfigDict:
  """Runs `get_config()` of the file at `path`, applies overrides, then
  checks the values (`validate`).

  `path` may name a row after a colon, `configs/paper.py:table2_cwcel_at`,
  which is passed to `get_config(row)` (ml_collections' config-file
  argument). Config files import their base as `from configs import
  default`, so the folder above `configs/` goes on sys.path.
  """
  path, _, argument = path.partition(":")
  path = os.path.abspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"config file not found: {path}")
  root = os.path.dirname(os.path.dirname(path))
  if root not in sys.path:
    sys.path.insert(0, root)
  name = "cxr_jax_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"{path} defines no get_config()")
  config = module.get_config(argument) if argument else module.get_config()
  apply_overrides(config, overrides)
  validate(config)
  return config


def _parse(text: str, current):
  if isinstance(current, bool):
    if text.lower() in ("true", "1", "yes"):
      return True
    if text.lower() in ("false", "0", "no"):
      return False
    raise ValueError(f"expected true or false, got {text!r}")
  if isinstance(current, int):
    return int(text)
  if isinstance(current, float):
    return float(text)
  if isinstance(current, str):
    return text
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


# Sub-dicts whose keys are checked by what consumes them: `config.model`
# holds keyword arguments of the chosen backbone, which `cxr_jax.models.build`
# checks against that backbone's options.
OPEN_SECTIONS = ("model", "loss_kwargs")


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Sequence[str]) -> None:
  """Applies `--config.a.b=value` (or `a.b=value`) strings, typed like the
  field they replace. An unknown key is an error that names it, except in
  OPEN_SECTIONS, where a new key is added (typed by its text)."""
  for item in overrides:
    key, sep, value = item.removeprefix("--").removeprefix("config.").partition(
        "=")
    if not sep:
      raise ConfigError(f"override {item!r} is not --config.KEY=VALUE")
    *parents, leaf = key.split(".")
    node = config
    for depth, p in enumerate(parents):
      if not isinstance(node, ml_collections.ConfigDict) or p not in node:
        raise KeyError(f"unknown config key {key!r}: "
                       f"{'.'.join(parents[:depth + 1])!r} is not a section")
      node = node[p]
    if not isinstance(node, ml_collections.ConfigDict):
      raise KeyError(f"unknown config key {key!r}: {'.'.join(parents)!r} is "
                     f"not a section")
    if leaf not in node:
      if ".".join(parents) in OPEN_SECTIONS:
        node[leaf] = _parse(value, None)
        continue
      raise KeyError(f"unknown config key {key!r}; known: "
                     f"{sorted(node.keys())}")
    current = node[leaf]
    try:
      parsed = _parse(value, current)
    except ValueError:
      raise ConfigError(f"--config.{key}={value!r}: expected "
                        f"{type(current).__name__}, like its value "
                        f"{current!r}") from None
    with node.ignore_type():
      node[leaf] = parsed


def _at_least(low: float) -> Callable[[Any], str | None]:
  return lambda v: None if v >= low else f"must be at least {low}"


def _finite_at_least(low: float) -> Callable[[Any], str | None]:
  return lambda v: None if math.isfinite(v) and v >= low else (
      f"must be a finite number of at least {low}")


# Numeric fields with a valid range, checked when a config is loaded so that
# a bad value is refused before any data is read or any model compiled.
# Fields a config lacks are skipped; the model's own options (config.model)
# are checked by the backbone that takes them, the optimizer's by optim.
RANGES: dict[str, Callable[[Any], str | None]] = {
    "image_size": _at_least(1),
    "split_seed": _at_least(0),
    "augment_min_crop": lambda v: None if 0 < v <= 1 else "must be in (0, 1]",
    "loader_threads": _at_least(1),
    "loader_workers": _at_least(0),
    "num_outputs": _at_least(1),
    "learning_rate": _finite_at_least(0),
    "batch_size": _at_least(1),
    "num_train_steps": _at_least(1),
    "eval_every_steps": _at_least(1),
    "eval_batch_size": _at_least(1),
    "log_every_steps": _at_least(1),
    "checkpoint_every_steps": _at_least(1),
    "max_eval_images": _at_least(0),
    "seed": _at_least(0),
}


# bfloat16 computes convolutions and activations in bfloat16 while
# parameters, optimizer state, BatchNorm statistics and the loss stay float32.
# float16 would need loss scaling, which the step does not do; float64 is for
# the exactness tests.
COMPUTE_DTYPES = ("float32", "bfloat16", "float64")


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises a ConfigError naming the first field out of its range (RANGES),
  or an image_size below what the backbone accepts."""
  for key, check in RANGES.items():
    if key not in config:
      continue
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ConfigError(f"--config.{key}={value!r}: expected a number")
    problem = check(value)
    if problem:
      raise ConfigError(f"--config.{key}={value!r} {problem}")
  dtype = (config.get("model") or {}).get("dtype", "float32")
  if str(dtype) not in COMPUTE_DTYPES:
    raise ConfigError(f"--config.model.dtype={dtype!r}: choose one of "
                      f"{', '.join(COMPUTE_DTYPES)}")
  if "model_name" in config and "image_size" in config:
    low = (models.min_input_size(config.model_name)
           if config.model_name in models.MODELS else None)
    if low is not None and config.image_size < low:
      raise ConfigError(
          f"--config.image_size={config.image_size} is too small for "
          f"{config.model_name}, which needs at least {low} px")
