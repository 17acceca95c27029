"""Loading `configs/<experiment>.py` files and `--config.KEY=VALUE` overrides."""

from __future__ import annotations

import ast
import importlib.util
import os
import sys
from typing import Sequence

import ml_collections


def load_config(path: str, overrides: Sequence[str] = ()
                ) -> ml_collections.ConfigDict:
  """Runs `get_config()` of the file at `path`, then applies overrides.

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
  return config


def _parse(text: str, current):
  if isinstance(current, bool):
    if text.lower() in ("true", "1", "yes"):
      return True
    if text.lower() in ("false", "0", "no"):
      return False
    raise ValueError(f"expected a boolean, got {text!r}")
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
      raise ValueError(f"override {item!r} is not KEY=VALUE")
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    if leaf not in node:
      if ".".join(parents) in OPEN_SECTIONS:
        node[leaf] = _parse(value, None)
        continue
      raise KeyError(f"unknown config key {key!r}; known: "
                     f"{sorted(node.keys())}")
    with node.ignore_type():
      node[leaf] = _parse(value, node[leaf])
