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
from typing import Any, Callable, Iterable, Mapping, Sequence

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


def _not_converted(path: str, error: Exception) -> ConversionError:
  return ConversionError(
      f"{path} is not a converted weights file (.npz written by "
      f"`cxr-jax convert-weights`): {error}")


def open_npz(path: str):
  if not os.path.exists(path):
    raise FileNotFoundError(f"converted weights file not found: {path}")
  try:
    return np.load(path, allow_pickle=False)
  except Exception as e:  # zipfile/ValueError: wrong or truncated file
    raise _not_converted(path, e) from None


def read_npz_arrays(path: str) -> dict[str, np.ndarray]:
  """Every member of a converted file, '__meta__' included. Members are read
  here, not on open: a pickled (object) array fails only when read, and is
  refused (allow_pickle=False: loading it could run code)."""
  with open_npz(path) as f:
    try:
      return {k: f[k] for k in f.files}
    except Exception as e:  # object arrays, truncated members
      raise _not_converted(path, e) from None


def load_pretrained(path: str) -> Tree:
  """Loads a converted file: `{'params': ..., 'batch_stats': ...}` (numpy)."""
  flat = {k: v for k, v in read_npz_arrays(path).items() if k != "__meta__"}
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
    try:
      return json.loads(f["__meta__"].tobytes().decode())
    except Exception as e:  # a pickled or garbled '__meta__'
      raise _not_converted(path, e) from None


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


Shapes = dict[str, tuple[int, ...]]


def _variable_shapes(model, size: int) -> dict[str, Shapes]:
  """{collection: {flat path: shape}} of `model`, without computing."""
  import jax
  import jax.numpy as jnp
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, size, size, 3))))
  return {collection: {p: tuple(v.shape) for p, v in flatten(tree).items()}
          for collection, tree in shapes.items()}


def expected_shapes(model, size: int, collection: str = "params") -> Shapes:
  """Shape of every variable of `model` by flat path, without computing."""
  return _variable_shapes(model, size)[collection]


def expected_variables(model, size: int, head: bool = True
                       ) -> tuple[Shapes, Shapes]:
  """(params, batch_stats) shapes of `model`. Without `head/` entries when
  the file has no head: the new head is initialised, not loaded."""
  shapes = _variable_shapes(model, size)
  params = shapes["params"]
  if not head:
    params = {k: v for k, v in params.items() if not k.startswith("head/")}
  return params, shapes.get("batch_stats", {})


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


def _prefix_in(path: str, names) -> tuple[str, str] | None:
  """(name, rest) for the name in `names` that `path` lies under
  (`path == name + "/" + rest`), else None. Names may hold '/'
  (`layer3/1`)."""
  parts = path.split("/")
  for k in range(1, len(parts)):
    head = "/".join(parts[:k])
    if head in names:
      return head, "/".join(parts[k:])
  return None


def per_block_shapes(shapes: Shapes, repeated: Mapping[str, Sequence[str]]
                     ) -> Shapes:
  """A scanned model's shapes with each group's stacked arrays split into
  its blocks' (`block35/conv/kernel` of shape (10, ...) becomes
  `block35_1/conv/kernel` ... `block35_10/conv/kernel`): the upstream's
  blocks, which converters map and name in their errors. `repeated` maps
  a group's module path to its blocks' paths, in order."""
  out = {}
  for path, shape in shapes.items():
    split = _prefix_in(path, repeated)
    if split is None:
      out[path] = shape
      continue
    group, rest = split
    members = repeated[group]
    if shape[:1] != (len(members),):
      raise ValueError(f"{path}: stacked shape {shape} should lead with "
                       f"{len(members)}, one per block of {group}")
    out.update({f"{m}/{rest}": tuple(shape[1:]) for m in members})
  return out


def stack_blocks(flat: Mapping[str, np.ndarray],
                 repeated: Mapping[str, Sequence[str]]
                 ) -> dict[str, np.ndarray]:
  """The inverse of `per_block_shapes` on arrays: each group's blocks'
  arrays stacked in the group's order under the group's name. Every other
  path passes through."""
  member_of = {m: (group, i) for group, members in repeated.items()
               for i, m in enumerate(members)}
  out, stacks = {}, {}
  for path, value in flat.items():
    split = _prefix_in(path, member_of)
    if split is None:
      out[path] = value
      continue
    (group, i), rest = member_of[split[0]], split[1]
    stacks.setdefault(f"{group}/{rest}", [None] * len(repeated[group]))[i] = (
        value)
  for path, arrays in stacks.items():
    out[path] = np.stack(arrays)  # checked_variables saw every block's
  return out


def checked_variables(path: str, params: Mapping[str, np.ndarray],
                      stats: Mapping[str, np.ndarray],
                      expected: Callable[[int | None], tuple[Shapes, Shapes]],
                      what: str, stats_what: str | None = None,
                      repeated: Mapping[str, Sequence[str]] | None = None
                      ) -> tuple[Tree, int | None]:
  """A converter's last step: the variables as float32 trees, and the
  head's class count (None for a file without a head), once every array
  fits `expected(class count)`, the model's (params, batch_stats) shapes.
  `what` names the model in errors (`stats_what` for the statistics).

  A scanned model (`models.common.repeat`) gives its `repeated` groups: the
  converter names arrays by the upstream's blocks (`block35_1/...`), they
  are checked block by block, then stacked into the model's layout."""
  num_classes = (int(params["head/bias"].shape[0]) if "head/bias" in params
                 else None)
  want_params, want_stats = expected(num_classes)
  repeated = repeated or {}
  check_shapes(path, params, per_block_shapes(want_params, repeated), what)
  check_shapes(path, stats, per_block_shapes(want_stats, repeated),
               stats_what or what)
  cast = lambda flat: unflatten({
      k: np.asarray(v, np.float32)
      for k, v in stack_blocks(flat, repeated).items()})
  return {"params": cast(params), "batch_stats": cast(stats)}, num_classes


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


def sort_keras_layers(layers: Mapping[str, list[tuple[str, np.ndarray]]],
                      log: logging.Logger, conv_bias: bool = False
                      ) -> tuple[list[str], list[str], list[str]]:
  """(convolutions, BatchNorms, dense layers) of a Keras file, told apart by
  the ranks of their arrays; convolutions and BatchNorms in creation-rank
  order, which anonymous layers' names carry. A convolution holds a kernel
  (and a bias where `conv_bias`); any other layer is logged, on the
  converter's `log`, as skipped."""
  convs, bns, dense = [], [], []
  for lname, weights in layers.items():
    ranks = [a.ndim for _, a in weights]
    if (ranks[:1] == [4] and all(r == 1 for r in ranks[1:]) and
        (conv_bias or len(ranks) == 1)):
      convs.append(lname)
    elif ranks and all(r == 1 for r in ranks):
      bns.append(lname)
    elif ranks == [2, 1]:
      dense.append(lname)
    else:
      log.info("skipped Keras layer %s with arrays of rank %s", lname, ranks)
  convs.sort(key=creation_rank)
  bns.sort(key=creation_rank)
  return convs, bns, dense


def fold_keras_conv_bn(path: str, layers, ours: str, conv_name: str,
                       bn_name: str, params: dict, stats: dict) -> None:
  """Stores Keras conv `conv_name` and its BatchNorm `bn_name` as our
  ConvBN `ours`, whose BatchNorm has no scale: gamma (Wx - mu) / s =
  (gamma W x - gamma mu) / s, so gamma goes into the kernel and the mean
  (exact at inference)."""
  kernel = layers[conv_name][0][1]
  gamma, beta, mean, var = keras_bn(bn_name, layers[bn_name])
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
  not_tensors = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
  if not_tensors:
    raise ConversionError(
        f"{path}: {len(not_tensors)} entries are not tensors, e.g. "
        f"{not_tensors[0]!r} holds a {type(sd[not_tensors[0]]).__name__}; "
        f"a state dict maps names to tensors")
  # DataParallel checkpoints prefix every key with 'module.'.
  return {re.sub(r"^module\.", "", k): v.detach().cpu().numpy().astype(
      np.float64) for k, v in sd.items()}


class StateDictReader:
  """A state dict read key by key. It remembers what was taken, so the
  entries left over can be logged as skipped or refused by name; a missing
  key is an error naming the file, the `source` and the key, then `hint`."""

  def __init__(self, path: str, entries: Mapping[str, np.ndarray],
               source: str = "torchvision", hint: str = ""):
    self.path, self.entries = path, entries
    self.source, self.hint = source, hint
    self.used: set[str] = set()

  def __contains__(self, key: str) -> bool:
    return key in self.entries

  def take(self, key: str) -> np.ndarray:
    if key not in self.entries:
      raise ConversionError(f"{self.path}: missing {self.source} key "
                            f"{key!r}{self.hint}")
    self.used.add(key)
    return self.entries[key]

  def kernel(self, key: str,
             expected: str = "a 2-D convolution's is 4-D (out, in, kh, kw)"
             ) -> np.ndarray:
    """Convolution weight `key` as our HWIO kernel; `expected` completes
    the error for a weight that is not 4-D."""
    w = self.take(key)
    if w.ndim != 4:
      raise ConversionError(f"{self.path}: {key} has shape {w.shape}; "
                            f"{expected}")
    return w.transpose(2, 3, 1, 0)  # OIHW -> HWIO

  def batch_norm(self, prefix: str) -> tuple[np.ndarray, ...]:
    """(weight, bias, running_mean, running_var) of BatchNorm `prefix`."""
    return tuple(self.take(f"{prefix}.{name}") for name in
                 ("weight", "bias", "running_mean", "running_var"))

  def load_batch_norm(self, prefix: str, ours: str, params: dict,
                      stats: dict) -> None:
    """BatchNorm `prefix` into our scaled BatchNorm `ours`."""
    (params[f"{ours}/scale"], params[f"{ours}/bias"], stats[f"{ours}/mean"],
     stats[f"{ours}/var"]) = self.batch_norm(prefix)

  def left_over(self) -> list[str]:
    """The keys no `take` asked for, sorted."""
    return sorted(set(self.entries) - self.used)

  def skip_left_over(self, log: logging.Logger, note: str = "",
                     refuse: Callable[[str], bool] | None = None,
                     owner: str = "", hint: str = "") -> None:
    """Logs each left-over entry as skipped, on the converter's `log`. With
    `refuse`, the left-over entries it picks (BatchNorm step counters
    aside) are instead an error: entries that `owner` does not have."""
    unused = self.left_over()
    strays = [k for k in unused if refuse is not None and refuse(k)
              and not k.endswith(".num_batches_tracked")]
    if strays:
      raise ConversionError(
          f"{self.path}: entries that {owner} does not have: "
          f"{', '.join(strays[:5])}{' ...' if len(strays) > 5 else ''} "
          f"{hint}")
    for key in unused:
      log.info("skipped %s entry %s %s" + note, self.source, key,
               tuple(self.entries[key].shape))
