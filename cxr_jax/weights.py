"""ImageNet weights from the files researchers have, converted by explicit maps.

Sources:

* **Keras legacy HDF5** (`inception_v3_weights_tf_dim_ordering_tf_kernels.h5`,
  what `keras.applications` downloads) and **Keras 3** `.weights.h5`. Keras
  names the layers anonymously (`conv2d`, `conv2d_1`, ... or `conv2d_1`, ... in
  Keras 2), and the legacy file lists them in graph order, not creation order.
  The numeric suffix *is* the creation order, and creation order is the order
  of `KERAS_CONV_ORDER` below, so conv number k maps to `KERAS_CONV_ORDER[k]`.
  Each conv's BatchNorm is the BN layer with the same rank.
* **torchvision** `inception_v3` state dicts (loaded with `weights_only=True`).
  Our module names are torchvision's, so the map is the identity on paths plus
  `fc -> head`. Two differences of computation are folded into the weights so
  that the converted model computes what the torchvision model computes:

  - torchvision's BatchNorm has a scale gamma; ours has none (as Keras). With
    y = gamma * (Wx - mu) / s + beta, we store W' = gamma * W and
    mu' = gamma * mu, which gives the same y (s is unchanged). This is exact at
    inference; in training mode the batch variance is gamma^2 times larger and
    only epsilon (1e-3) sees the difference.
  - torchvision's block average pools count the padding; the converted file
    records `pool_include_padding=True` and `model_kwargs()` hands that to
    `InceptionV3`.
  - `transform_input`: torchvision's pretrained model (transform_input=True)
    maps ImageNet-normalised inputs back to [-1, 1], which is exactly what our
    model takes, so nothing is folded. A model trained with
    transform_input=False expects ImageNet-normalised inputs; then the affine
    map [-1, 1] -> normalised is folded into the first convolution (its
    kernel is scaled per input channel, and the constant it adds, exact
    because that conv pads nothing, is folded into the BatchNorm mean).

  The equality statement: for x in [-1, 1],
  `flax(x) == torch_model(imagenet_normalize((x + 1) / 2))`.

A converted file is an `.npz` of `params/...` and `batch_stats/...` arrays plus
a JSON `__meta__` entry (source, model attributes). Nothing is pickled.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from typing import Any, Iterable, Mapping

import numpy as np

from cxr_jax.models.inception_v3 import BLOCKS, STEM

log = logging.getLogger(__name__)

Tree = dict[str, Any]


class ConversionError(ValueError):
  """A weights file that cannot be converted or merged; the message says why."""


# The convolutions of each block in Keras' creation order (see
# keras/applications/inception_v3.py). Our names are torchvision's.
_BLOCK_CONVS = {
    "InceptionA": ("branch1x1", "branch5x5_1", "branch5x5_2", "branch3x3dbl_1",
                   "branch3x3dbl_2", "branch3x3dbl_3", "branch_pool"),
    "InceptionB": ("branch3x3", "branch3x3dbl_1", "branch3x3dbl_2",
                   "branch3x3dbl_3"),
    "InceptionC": ("branch1x1", "branch7x7_1", "branch7x7_2", "branch7x7_3",
                   "branch7x7dbl_1", "branch7x7dbl_2", "branch7x7dbl_3",
                   "branch7x7dbl_4", "branch7x7dbl_5", "branch_pool"),
    "InceptionD": ("branch3x3_1", "branch3x3_2", "branch7x7x3_1",
                   "branch7x7x3_2", "branch7x7x3_3", "branch7x7x3_4"),
    "InceptionE": ("branch1x1", "branch3x3_1", "branch3x3_2a", "branch3x3_2b",
                   "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3a",
                   "branch3x3dbl_3b", "branch_pool"),
}
# A Keras 3 `.weights.h5` names layers by their rank in `model.layers`, which
# is the functional graph's order: deepest node first (farthest from the
# block's concatenation), ties in creation order. Read off keras 3.15's
# InceptionV3 and proven by the parity tests.
_BLOCK_CONVS_GRAPH_ORDER = {
    "InceptionA": ("branch3x3dbl_1", "branch5x5_1", "branch3x3dbl_2",
                   "branch1x1", "branch5x5_2", "branch3x3dbl_3", "branch_pool"),
    "InceptionB": ("branch3x3dbl_1", "branch3x3dbl_2", "branch3x3",
                   "branch3x3dbl_3"),
    "InceptionC": ("branch7x7dbl_1", "branch7x7dbl_2", "branch7x7_1",
                   "branch7x7dbl_3", "branch7x7_2", "branch7x7dbl_4",
                   "branch1x1", "branch7x7_3", "branch7x7dbl_5", "branch_pool"),
    "InceptionD": ("branch7x7x3_1", "branch7x7x3_2", "branch3x3_1",
                   "branch7x7x3_3", "branch3x3_2", "branch7x7x3_4"),
    "InceptionE": ("branch3x3dbl_1", "branch3x3_1", "branch3x3dbl_2",
                   "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_3a",
                   "branch3x3dbl_3b", "branch1x1", "branch_pool"),
}


def _conv_order(block_convs: Mapping[str, tuple[str, ...]]) -> tuple[str, ...]:
  order = [name for name, *_ in STEM]
  for block, cls, _ in BLOCKS:
    order += [f"{block}/{conv}" for conv in block_convs[cls.__name__]]
  return tuple(order)


# Legacy .h5 files keep Keras' auto-names, whose suffix is the creation rank.
KERAS_CONV_ORDER = _conv_order(_BLOCK_CONVS)
KERAS3_CONV_ORDER = _conv_order(_BLOCK_CONVS_GRAPH_ORDER)
assert len(KERAS_CONV_ORDER) == 94 and set(KERAS_CONV_ORDER) == set(
    KERAS3_CONV_ORDER)
_AUX_CONVS = ("AuxLogits/conv0", "AuxLogits/conv1")

# torchvision's pretrained weights expect ImageNet-normalised inputs.
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float64)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float64)


# --------------------------------------------------------------------------
# Trees and files
# --------------------------------------------------------------------------

def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    path = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(_flatten(v, path + "/"))
    else:
      out[path] = v
  return out


def _unflatten(flat: Mapping[str, Any]) -> Tree:
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
  flat = {k: np.asarray(v, np.float32) for k, v in _flatten(variables).items()}
  flat["__meta__"] = np.frombuffer(json.dumps(dict(meta)).encode(), np.uint8)
  tmp = path + ".tmp.npz"
  np.savez(tmp, **flat)
  os.replace(tmp, path)


def _open_npz(path: str):
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
  with _open_npz(path) as f:
    flat = {k: f[k] for k in f.files if k != "__meta__"}
  tree = _unflatten(flat)
  if "params" not in tree:
    raise ConversionError(f"{path} holds no 'params' entries")
  tree.setdefault("batch_stats", {})
  return tree


def read_metadata(path: str) -> dict[str, Any]:
  """The converted file's metadata: source and the model attributes it needs."""
  with _open_npz(path) as f:
    if "__meta__" not in f.files:
      return {}
    return json.loads(f["__meta__"].tobytes().decode())


def model_kwargs(path: str) -> dict[str, Any]:
  """`InceptionV3` attributes that make a model compute what the source did."""
  meta = read_metadata(path)
  return {"pool_include_padding": bool(meta.get("pool_include_padding", False))}


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
  model_flat = _flatten(init_variables)
  file_flat = _flatten(pretrained)
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
  return _unflatten(merged)


# --------------------------------------------------------------------------
# Keras
# --------------------------------------------------------------------------

def _suffix(name: str) -> int:
  """Creation rank from a Keras auto-name: conv2d -> 0, conv2d_12 -> 12."""
  m = re.search(r"_(\d+)$", name)
  return int(m.group(1)) if m else 0


def _read_keras_layers(path: str
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


def _keras_bn(lname: str, weights: list[tuple[str, np.ndarray]]):
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


@functools.lru_cache(maxsize=1)
def _expected_kernel_shapes() -> dict[str, tuple[int, ...]]:
  """Kernel shape of every BasicConv of our model, by path (no compute)."""
  import jax
  import jax.numpy as jnp
  from cxr_jax.models import InceptionV3
  shapes = jax.eval_shape(
      lambda: InceptionV3(num_classes=1).init(
          jax.random.key(0), jnp.zeros((1, 299, 299, 3))))
  flat = _flatten(shapes["params"])
  return {p[:-len("/conv/kernel")]: tuple(v.shape) for p, v in flat.items()
          if p.endswith("/conv/kernel")}


def convert_keras(path: str) -> tuple[Tree, dict[str, Any]]:
  """Converts a Keras InceptionV3 weights file (legacy .h5 or .weights.h5)."""
  layout, layers = _read_keras_layers(path)
  order = KERAS_CONV_ORDER if layout == "legacy" else KERAS3_CONV_ORDER
  expected = _expected_kernel_shapes()
  convs, bns, dense = [], [], []
  for lname, weights in layers.items():
    shapes = [a.ndim for _, a in weights]
    if shapes == [4]:
      convs.append(lname)
    elif shapes and all(d == 1 for d in shapes):
      bns.append(lname)
    elif shapes == [2, 1]:
      dense.append(lname)
    else:
      log.info("skipped Keras layer %s with arrays of rank %s", lname, shapes)
  convs.sort(key=_suffix)
  bns.sort(key=_suffix)
  if len(convs) != len(KERAS_CONV_ORDER) or len(bns) != len(KERAS_CONV_ORDER):
    raise ConversionError(
        f"{path}: found {len(convs)} convolutions and {len(bns)} BatchNorm "
        f"layers; InceptionV3 has {len(KERAS_CONV_ORDER)} of each")
  if len(dense) > 1:
    raise ConversionError(f"{path}: more than one dense layer: {dense}")
  params, stats = {}, {}
  for ours, conv_name, bn_name in zip(order, convs, bns):
    kernel = layers[conv_name][0][1]
    if kernel.shape != expected[ours]:
      raise ConversionError(
          f"{path} ({layout} layout): layer {conv_name} maps to {ours}, whose "
          f"kernel is {expected[ours]}, but the file's is {kernel.shape}")
    gamma, beta, mean, var = _keras_bn(bn_name, layers[bn_name])
    if kernel.shape[-1] != beta.shape[0]:
      raise ConversionError(
          f"{path}: {conv_name} (as {ours}) has {kernel.shape[-1]} filters but "
          f"{bn_name} normalises {beta.shape[0]} channels: layer order broken")
    if gamma is not None:
      kernel, mean = kernel * gamma, mean * gamma
    params[f"{ours}/conv/kernel"] = kernel
    params[f"{ours}/bn/bias"] = beta
    stats[f"{ours}/bn/mean"] = mean
    stats[f"{ours}/bn/var"] = var
  if dense:
    (_, kernel), (_, bias) = layers[dense[0]]
    params["head/kernel"], params["head/bias"] = kernel, bias
  num_classes = int(params["head/bias"].shape[0]) if dense else None
  meta = {"source": "keras", "layout": layout,
          "input": os.path.basename(path),
          "num_classes": num_classes, "pool_include_padding": False}
  log.info("converted %d Keras convolutions%s from %s", len(convs),
           f" and a {num_classes}-way head" if dense else "", path)
  return {"params": _unflatten(params), "batch_stats": _unflatten(stats)}, meta


# --------------------------------------------------------------------------
# torchvision
# --------------------------------------------------------------------------

def _load_torch_state_dict(path: str) -> dict[str, np.ndarray]:
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


def convert_torchvision(path: str, transform_input: bool = True
                        ) -> tuple[Tree, dict[str, Any]]:
  """Converts a torchvision `inception_v3` state dict (see module docstring)."""
  sd = _load_torch_state_dict(path)
  used = set()

  def take(key):
    if key not in sd:
      raise ConversionError(f"{path}: missing torchvision key {key!r}")
    used.add(key)
    return sd[key]

  has_aux = any(k.startswith("AuxLogits.") for k in sd)
  params, stats = {}, {}
  for ours in KERAS_CONV_ORDER + (_AUX_CONVS if has_aux else ()):
    tv = ours.replace("/", ".")
    w = take(f"{tv}.conv.weight").transpose(2, 3, 1, 0)  # OIHW -> HWIO
    gamma, beta = take(f"{tv}.bn.weight"), take(f"{tv}.bn.bias")
    mean, var = take(f"{tv}.bn.running_mean"), take(f"{tv}.bn.running_var")
    if ours == KERAS_CONV_ORDER[0] and not transform_input:
      # z = a*x + b maps our [-1, 1] input to ImageNet normalisation.
      a = 1.0 / (2.0 * IMAGENET_STD)
      b = (0.5 - IMAGENET_MEAN) / IMAGENET_STD
      mean = mean - np.einsum("hwio,i->o", w, b)
      w = w * a[None, None, :, None]
    if w.shape[-1] != beta.shape[0]:
      raise ConversionError(f"{path}: {tv}.conv has {w.shape[-1]} filters but "
                            f"its BatchNorm has {beta.shape[0]} channels")
    params[f"{ours}/conv/kernel"] = w * gamma
    params[f"{ours}/bn/bias"] = beta
    stats[f"{ours}/bn/mean"] = mean * gamma
    stats[f"{ours}/bn/var"] = var
  params["head/kernel"] = take("fc.weight").T
  params["head/bias"] = take("fc.bias")
  if has_aux:
    params["AuxLogits/fc/kernel"] = take("AuxLogits.fc.weight").T
    params["AuxLogits/fc/bias"] = take("AuxLogits.fc.bias")
  for key in sorted(set(sd) - used):
    log.info("skipped torchvision entry %s %s", key, tuple(sd[key].shape))
  cast = lambda t: {k: v.astype(np.float32) for k, v in t.items()}
  meta = {"source": "torchvision", "input": os.path.basename(path),
          "num_classes": int(params["head/bias"].shape[0]),
          "aux_logits": has_aux, "transform_input": transform_input,
          "pool_include_padding": True}
  log.info("converted torchvision inception_v3 (%d tensors used) from %s",
           len(used), path)
  return ({"params": _unflatten(cast(params)),
           "batch_stats": _unflatten(cast(stats))}, meta)


def fetch_keras_imagenet() -> str:
  """Has keras.applications download its ImageNet file (needs internet).

  Building the model with weights='imagenet' downloads and caches the legacy
  .h5 under ~/.keras/models; we convert that file, not the Keras model.
  """
  os.environ.setdefault("KERAS_BACKEND", "jax")
  import keras
  keras.applications.InceptionV3(weights="imagenet")
  path = os.path.join(os.path.expanduser(os.environ.get("KERAS_HOME", "~/.keras")),
                      "models", "inception_v3_weights_tf_dim_ordering_tf_kernels.h5")
  if not os.path.exists(path):
    raise ConversionError(f"keras.applications did not leave {path}")
  return path


def convert(source: str, input_path: str | None, output_path: str,
            transform_input: bool = True) -> dict[str, Any]:
  """The `convert-weights` command: converts and writes; returns the metadata."""
  if source == "keras-imagenet":
    input_path = input_path or fetch_keras_imagenet()
    source = "keras"
  if not input_path:
    raise ConversionError(f"--input is required for --source {source}")
  if source == "keras":
    variables, meta = convert_keras(input_path)
  elif source == "torchvision":
    variables, meta = convert_torchvision(input_path, transform_input)
  else:
    raise ConversionError(f"unknown source {source!r}; expected keras, "
                          f"keras-imagenet or torchvision")
  save_converted(output_path, variables, meta)
  return meta
