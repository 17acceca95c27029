"""What every converter shares: the converted-file format, the generic merge
into a freshly initialised model, and readers for Keras HDF5 files and
PyTorch state dicts.

A converted file is an `.npz` of `params/...` and `batch_stats/...` arrays
plus a JSON `__meta__` entry. Nothing is pickled. The metadata records the
source and every architecture fact the weights need
(`{"model": name, "model_kwargs": {...}}`), so that a run records them in its
config and never needs the file again to rebuild its model.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any, Iterable, Mapping

import numpy as np

log = logging.getLogger("cxr_jax.weights")

Tree = dict[str, Any]

class ConversionError(ValueError):
  """A weights file that cannot be converted or merged; the message says why."""


# torchvision's pretrained weights expect ImageNet-normalised inputs.
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float64)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float64)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    path = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(flatten(v, path + "/"))
    else:
      out[path] = v
  return out


def unflatten(flat: Mapping[str, Any]) -> Tree:
  tree: Tree = {}
  for path, v in flat.items():
    node = tree
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return tree


def save_converted(path: str, variables: Mapping[str, Any],
                   meta: Mapping[str, Any]) -> None:
  """Writes converted variables and their metadata to an `.npz` file."""
  flat = {k: np.asarray(v, np.float32) for k, v in flatten(variables).items()}
  flat["__meta__"] = np.frombuffer(json.dumps(dict(meta)).encode(), np.uint8)
  tmp = path + ".tmp.npz"
  np.savez(tmp, **flat)
  os.replace(tmp, path)


def open_npz(path: str):
  if not os.path.exists(path):
    raise FileNotFoundError(f"converted weights file not found: {path}")
  try:
    return np.load(path, allow_pickle=False)
  except Exception as e:  # zipfile/ValueError: wrong or truncated file
    raise ConversionError(
        f"{path} is not a converted weights file (.npz written by "
        f"`cxr-jax convert-weights`): {e}") from None


def load_pretrained(path: str) -> Tree:
  """Loads a converted file: `{'params': ..., 'batch_stats': ...}` (numpy)."""
  with open_npz(path) as f:
    flat = {k: f[k] for k in f.files if k != "__meta__"}
  tree = unflatten(flat)
  if "params" not in tree:
    raise ConversionError(f"{path} holds no 'params' entries")
  tree.setdefault("batch_stats", {})
  return tree


def read_metadata(path: str) -> dict[str, Any]:
  """The converted file's metadata: source and the model attributes it needs."""
  with open_npz(path) as f:
    if "__meta__" not in f.files:
      return {}
    return json.loads(f["__meta__"].tobytes().decode())


def architecture(path: str) -> tuple[str, dict[str, Any]]:
  """(model name, model keyword arguments) that make a model compute what the
  weights' source computed: the facts a run copies into `config.model`.

  Files written before the zoo recorded only InceptionV3's
  `pool_include_padding`; they read as InceptionV3.
  """
  meta = read_metadata(path)
  if "model" in meta:
    return meta["model"], dict(meta.get("model_kwargs", {}))
  return "inception_v3", {
      "pool_include_padding": bool(meta.get("pool_include_padding", False))}


def expected_shapes(model, size: int, collection: str = "params"
                    ) -> dict[str, tuple[int, ...]]:
  """Shape of every variable of `model` by flat path, without computing."""
  import jax
  import jax.numpy as jnp
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, size, size, 3))))
  return {p: tuple(v.shape) for p, v in flatten(shapes[collection]).items()}


def check_shapes(path: str, converted: Mapping[str, np.ndarray],
                 expected: Mapping[str, tuple[int, ...]], what: str) -> None:
  """Every converted array against the model's shape; names each problem:
  a missing, unexpected or mismatched parameter."""
  problems = []
  for key in sorted(set(expected) - set(converted)):
    problems.append(f"{key}: the model has it {expected[key]}, the file "
                    f"gave nothing")
  for key in sorted(set(converted) - set(expected)):
    problems.append(f"{key}: converted from the file but not in {what}")
  for key in sorted(set(converted) & set(expected)):
    if tuple(converted[key].shape) != tuple(expected[key]):
      problems.append(f"{key}: model shape {expected[key]} != file shape "
                      f"{tuple(converted[key].shape)}")
  if problems:
    raise ConversionError(f"{path} does not fit {what}:\n  " +
                          "\n  ".join(problems))


# --------------------------------------------------------------------------
# Merging into a freshly initialised model
# --------------------------------------------------------------------------

def merge_pretrained(init_variables: Mapping[str, Any],
                     pretrained: Mapping[str, Any],
                     dont_load: Iterable[str] = ()) -> Tree:
  """Loads `pretrained` into `init_variables`, parameter by parameter.

  `dont_load` holds regexes over paths like `params/head/kernel`; matching
  parameters keep their initial values (the new 15-output head does). Every
  kept or skipped parameter is logged. A parameter of the model that the file
  lacks, or whose shape differs, is an error that names it.
  """
  patterns = [re.compile(p) for p in dont_load]
  ignored = lambda path: any(p.search(path) for p in patterns)
  model_flat = flatten(init_variables)
  file_flat = flatten(pretrained)
  merged = {}
  problems = []
  for path, init_value in model_flat.items():
    if ignored(path):
      log.info("kept at init (dont_load): %s %s", path, tuple(init_value.shape))
      merged[path] = init_value
      continue
    if path not in file_flat:
      problems.append(f"{path}: in the model {tuple(init_value.shape)}, "
                      f"missing from the weights file")
      continue
    value = file_flat[path]
    if tuple(value.shape) != tuple(init_value.shape):
      problems.append(f"{path}: model shape {tuple(init_value.shape)} != "
                      f"file shape {tuple(value.shape)}")
      continue
    merged[path] = np.asarray(value, dtype=init_value.dtype)
  for path in sorted(set(file_flat) - set(model_flat)):
    log.info("skipped (not in the model): %s %s", path,
             tuple(file_flat[path].shape))
  if problems:
    raise ConversionError("pretrained weights do not fit the model:\n  " +
                          "\n  ".join(problems))
  log.info("loaded %d of %d model arrays from the pretrained weights",
           sum(not ignored(p) for p in model_flat), len(model_flat))
  return unflatten(merged)


# --------------------------------------------------------------------------
# Keras HDF5
# --------------------------------------------------------------------------

def creation_rank(name: str) -> int:
  """Creation rank from a Keras auto-name: conv2d -> 0, conv2d_12 -> 12."""
  m = re.search(r"_(\d+)$", name)
  return int(m.group(1)) if m else 0


def read_keras_layers(path: str
                       ) -> tuple[str, dict[str, list[tuple[str, np.ndarray]]]]:
  """(layout, {layer name: [(weight name, array), ...]}) of a Keras file."""
  import h5py
  if not os.path.exists(path):
    raise FileNotFoundError(f"Keras weights file not found: {path}")
  try:
    f = h5py.File(path, "r")
  except OSError as e:
    raise ConversionError(
        f"{path} is not a readable HDF5 file (truncated, or not a Keras "
        f"weights file): {e}") from None
  layers: dict[str, list[tuple[str, np.ndarray]]] = {}
  try:
    with f:
      root = f["model_weights"] if "model_weights" in f else f
      if "layer_names" in root.attrs:  # legacy layout, Keras 1/2/3
        layout = "legacy"
        for lname in root.attrs["layer_names"]:
          lname = lname.decode() if isinstance(lname, bytes) else str(lname)
          group = root[lname]
          wnames = [w.decode() if isinstance(w, bytes) else str(w)
                    for w in group.attrs.get("weight_names", [])]
          if wnames:
            layers[lname] = [(w, np.asarray(group[w])) for w in wnames]
      elif "layers" in root:  # Keras 3 `.weights.h5`
        layout = "keras3"
        for lname, group in root["layers"].items():
          if "vars" in group and len(group["vars"]):
            keys = sorted(group["vars"].keys(), key=int)
            layers[lname] = [(k, np.asarray(group["vars"][k])) for k in keys]
      else:
        raise ConversionError(
            f"{path} is HDF5 but neither a legacy Keras weights file (no "
            f"'layer_names' attribute) nor a Keras 3 .weights.h5 (no 'layers' "
            f"group)")
  except (OSError, KeyError) as e:
    raise ConversionError(f"{path}: damaged Keras weights file: {e}") from None
  return layout, layers


def keras_bn(lname: str, weights: list[tuple[str, np.ndarray]]):
  """(gamma or None, beta, mean, var) of a Keras BatchNormalization layer."""
  named = {}
  for wname, arr in weights:
    for key in ("gamma", "beta", "moving_mean", "moving_variance"):
      if key in wname:
        named[key] = arr
  if len(named) != len(weights):  # Keras 3 layout: positional, no names
    keys = (["gamma"] if len(weights) == 4 else []) + [
        "beta", "moving_mean", "moving_variance"]
    if len(weights) != len(keys):
      raise ConversionError(f"BatchNorm layer {lname} has {len(weights)} "
                            f"arrays; expected 3 (no scale) or 4")
    named = {k: a for k, (_, a) in zip(keys, weights)}
  return (named.get("gamma"), named["beta"], named["moving_mean"],
          named["moving_variance"])


# --------------------------------------------------------------------------
# PyTorch state dicts
# --------------------------------------------------------------------------

def load_torch_state_dict(path: str) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError:
    raise ConversionError("reading a .pth file needs PyTorch: "
                          "pip install torch") from None
  if not os.path.exists(path):
    raise FileNotFoundError(f"torchvision weights file not found: {path}")
  try:
    sd = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:
    raise ConversionError(f"{path} is not a readable PyTorch state dict "
                          f"(truncated or wrong format): {e}") from None
  if isinstance(sd, Mapping) and "state_dict" in sd:
    sd = sd["state_dict"]
  if not isinstance(sd, Mapping):
    raise ConversionError(f"{path} holds a {type(sd).__name__}, not a "
                          f"state dict")
  # DataParallel checkpoints prefix every key with 'module.'.
  return {re.sub(r"^module\.", "", k): v.detach().cpu().numpy().astype(
      np.float64) for k, v in sd.items()}


