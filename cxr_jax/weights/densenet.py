"""DenseNet-121/169/201 converters: Keras and torchvision weights (CheXNet's
checkpoints included), by one explicit layer list.

`layer_list(depth)` lists every convolution and BatchNorm in network order as
(Keras name, our path); our paths are torchvision's module names with '/'.

Sources:

* **Keras** legacy `.h5` (the `densenet121_weights_tf_dim_ordering_tf_kernels`
  files, full or `_notop`; Keras 2 named the stem `conv1/conv`, `conv1/bn`
  and the head `fc1000`, Keras 3 `conv1_conv`, `conv1_bn`, `predictions`) and
  Keras 3 `.weights.h5`, which names layers by class and rank (`conv2d_7`,
  `batch_normalization_12`) in `model.layers` order. Keras lists DenseNet's
  layers in network order (each dense layer is a chain that ends in a
  concatenation), which is `layer_list`'s; named files are matched by name.
* **torchvision** state dicts, and the older DenseNet keys that CheXNet-era
  checkpoints carry: `norm.1`, `relu.1`, `conv.1`, `norm.2`, `conv.2` (before
  PyTorch forbade '.' in module names), a `module.` prefix (DataParallel),
  the `densenet121.` attribute of CheXNet's wrapper module and its
  `classifier.0.` head (arnoweng/CheXNet: `Sequential(Linear, Sigmoid)`; our
  logits are that Linear's output, before the Sigmoid). Loaded into a
  modern torchvision model without renaming (`strict=False`), those layers
  keep their initial values, which is how CheXNet reproductions end up at an
  AUC of 0.5; here every key is renamed explicitly and a key left over is an
  error.

Both record `variant` (BatchNorm epsilon: Keras 1.001e-5, torchvision 1e-5)
and `input_norm='torch'` (Keras' DenseNet preprocessing is torchvision's).
"""

from __future__ import annotations

import functools
import logging
import os
import re
from typing import Any

import numpy as np

from cxr_jax.models.densenet import BLOCK_CONFIGS, DenseNet
from cxr_jax.weights.common import (ConversionError, StateDictReader, Tree,
                                    checked_variables, creation_rank,
                                    expected_variables, keras_bn,
                                    load_torch_state_dict, read_keras_layers)

log = logging.getLogger(__name__)

MODELS = tuple(f"densenet{d}" for d in BLOCK_CONFIGS)


def _depth(path: str, model: str) -> int:
  if model not in MODELS:
    raise ConversionError(f"{path}: the DenseNet converter converts "
                          f"{MODELS}, not {model!r}")
  return int(model[len("densenet"):])


@functools.lru_cache(maxsize=None)
def layer_list(depth: int) -> tuple[tuple[str, str, str], ...]:
  """(Keras name, our path, 'conv' | 'bn') of every layer with weights, in
  network order, which is also Keras' `model.layers` order."""
  out = [("conv1_conv", "features/conv0", "conv"),
         ("conv1_bn", "features/norm0", "bn")]
  config = BLOCK_CONFIGS[depth]
  for b, n in enumerate(config):
    for i in range(n):
      k, ours = f"conv{b + 2}_block{i + 1}", (
          f"features/denseblock{b + 1}/denselayer{i + 1}")
      out += [(f"{k}_0_bn", f"{ours}/norm1", "bn"),
              (f"{k}_1_conv", f"{ours}/conv1", "conv"),
              (f"{k}_1_bn", f"{ours}/norm2", "bn"),
              (f"{k}_2_conv", f"{ours}/conv2", "conv")]
    if b != len(config) - 1:
      out += [(f"pool{b + 2}_bn", f"features/transition{b + 1}/norm", "bn"),
              (f"pool{b + 2}_conv", f"features/transition{b + 1}/conv",
               "conv")]
  out.append(("bn", "features/norm5", "bn"))
  return tuple(out)


@functools.lru_cache(maxsize=None)
def _expected(depth: int, num_classes: int | None
              ) -> tuple[dict[str, tuple], dict[str, tuple]]:
  """(params, batch_stats) shapes of our model; without `head` when the file
  has none (a `_notop` or features-only file)."""
  model = DenseNet(num_classes=num_classes or 1, depth=depth)
  return expected_variables(model, 64, head=num_classes is not None)


def _finish(path: str, model: str, depth: int, params: dict, stats: dict,
            meta: dict[str, Any]) -> tuple[Tree, dict[str, Any]]:
  variables, num_classes = checked_variables(
      path, params, stats, functools.partial(_expected, depth),
      f"{model}'s parameters", f"{model}'s BatchNorm statistics")
  return variables, {**meta, "input": os.path.basename(path),
                     "num_classes": num_classes, "model": model}


# --------------------------------------------------------------------------
# Keras
# --------------------------------------------------------------------------

def _keras_kind(weights: list[tuple[str, np.ndarray]]) -> str | None:
  ranks = [a.ndim for _, a in weights]
  if ranks == [4]:
    return "conv"
  if len(ranks) in (3, 4) and all(r == 1 for r in ranks):
    return "bn"
  if ranks == [2, 1]:
    return "dense"
  return None


def convert_keras(path: str, model: str = "densenet121"
                  ) -> tuple[Tree, dict[str, Any]]:
  """Converts a Keras DenseNet weights file (legacy .h5 or .weights.h5)."""
  depth = _depth(path, model)
  layout, raw = read_keras_layers(path)
  # Keras 2 wrote the stem as `conv1/conv`; h5py reads that as a nested
  # group, and the name with '_' is Keras 3's.
  layers = {name.replace("/", "_"): w for name, w in raw.items()}
  kinds = {name: _keras_kind(w) for name, w in layers.items()}
  for name in [n for n, k in kinds.items() if k is None]:
    log.info("skipped Keras layer %s (arrays of rank %s)", name,
             [a.ndim for _, a in layers[name]])
  dense = sorted(n for n, k in kinds.items() if k == "dense")
  if len(dense) > 1:
    raise ConversionError(f"{path}: more than one dense layer ({dense}); "
                          f"DenseNet has one classifier")
  expected = layer_list(depth)
  if "conv1_conv" in layers:  # named layers (every legacy .h5)
    pairs = []
    for keras_name, ours, kind in expected:
      if keras_name not in layers:
        raise ConversionError(f"{path} ({layout} layout): no layer "
                              f"{keras_name!r} (our {ours}) for {model}")
      pairs.append((keras_name, ours, kind))
    extra = sorted(set(n for n, k in kinds.items() if k in ("conv", "bn")) -
                   {k for k, _, _ in expected})
    if extra:
      raise ConversionError(f"{path}: layers {extra[:4]} are not part of "
                            f"{model} (a deeper DenseNet's file?)")
  else:  # Keras 3 .weights.h5: class names and ranks in model.layers order
    found = {kind: sorted((n for n, k in kinds.items() if k == kind),
                          key=creation_rank) for kind in ("conv", "bn")}
    pairs = []
    for kind in ("conv", "bn"):
      ours = [(k, o) for k, o, t in expected if t == kind]
      if len(found[kind]) != len(ours):
        raise ConversionError(
            f"{path} ({layout} layout): {len(found[kind])} {kind} layers; "
            f"{model} has {len(ours)}")
      pairs += [(name, o, kind) for name, (_, o) in zip(found[kind], ours)]
  params, stats = {}, {}
  for name, ours, kind in pairs:
    if kinds[name] != kind:
      raise ConversionError(f"{path}: layer {name} (our {ours}) should be a "
                            f"{kind} layer but holds arrays of shapes "
                            f"{[a.shape for _, a in layers[name]]}")
    if kind == "conv":
      params[f"{ours}/kernel"] = layers[name][0][1]
      continue
    gamma, beta, mean, var = keras_bn(name, layers[name])
    if gamma is None:
      raise ConversionError(f"{path}: BatchNorm layer {name} (our {ours}) "
                            f"has no gamma; DenseNet's BatchNorms all scale")
    params[f"{ours}/scale"], params[f"{ours}/bias"] = gamma, beta
    stats[f"{ours}/mean"], stats[f"{ours}/var"] = mean, var
  if dense:
    (_, kernel), (_, bias) = layers[dense[0]]
    params["head/kernel"], params["head/bias"] = kernel, bias
  log.info("converted %d Keras layers%s from %s", len(pairs),
           f" and the head {dense[0]}" if dense else "", path)
  return _finish(path, model, depth, params, stats, {
      "source": "keras", "layout": layout,
      "model_kwargs": {"variant": "keras", "input_norm": "torch"}})


# --------------------------------------------------------------------------
# torchvision (and CheXNet-era checkpoints)
# --------------------------------------------------------------------------

# torchvision's own pattern for the old DenseNet keys
# (torchvision/models/densenet.py, `_load_state_dict`).
_LEGACY_LAYER_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
    r"((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def torchvision_key(key: str) -> str:
  """A DenseNet state-dict key as today's torchvision names it:
  `module.densenet121.features.denseblock1.denselayer1.norm.1.weight` ->
  `features.denseblock1.denselayer1.norm1.weight`,
  `module.densenet121.classifier.0.bias` -> `classifier.bias`."""
  key = re.sub(r"^(module\.)+", "", key)
  key = re.sub(r"^densenet\d+\.", "", key)  # CheXNet's wrapper attribute
  key = re.sub(r"^(module\.)+", "", key)
  m = _LEGACY_LAYER_KEY.match(key)
  if m:
    key = m.group(1) + m.group(2)
  return re.sub(r"^classifier\.0\.", "classifier.", key)


def convert_torchvision(path: str, model: str = "densenet121"
                        ) -> tuple[Tree, dict[str, Any]]:
  """Converts a torchvision DenseNet state dict, legacy keys included."""
  depth = _depth(path, model)
  raw = load_torch_state_dict(path)
  sd, origin = {}, {}
  for key, value in raw.items():
    new = torchvision_key(key)
    if new in sd:
      raise ConversionError(f"{path}: keys {origin[new]!r} and {key!r} both "
                            f"name {new!r}")
    sd[new], origin[new] = value, key
  renamed = sum(k != origin[k] for k in sd)
  if "features.conv0.weight" not in sd:
    raise ConversionError(
        f"{path} is not a torchvision DenseNet state dict: no "
        f"'features.conv0.weight' (its first keys: {list(raw)[:3]})")
  entries = StateDictReader(path, sd, hint=f" for {model}")
  params, stats = {}, {}
  for _, ours, kind in layer_list(depth):
    tv = ours.replace("/", ".")
    if kind == "conv":
      params[f"{ours}/kernel"] = entries.take(f"{tv}.weight").transpose(
          2, 3, 1, 0)  # OIHW -> HWIO
    else:
      entries.load_batch_norm(tv, ours, params, stats)
  if "classifier.weight" in sd:
    params["head/kernel"] = entries.take("classifier.weight").T
    params["head/bias"] = entries.take("classifier.bias")
  left = entries.left_over()
  for key in [k for k in left if k.endswith("num_batches_tracked")]:
    log.info("skipped torchvision entry %s (a BatchNorm step counter)",
             origin[key])
  extra = [k for k in left if not k.endswith("num_batches_tracked")]
  if extra:
    raise ConversionError(
        f"{path}: entries {[origin[k] for k in extra[:4]]} are not part of "
        f"{model} (a deeper DenseNet's file, or another model's?)")
  if renamed:
    log.info("renamed %d legacy/wrapped DenseNet keys (e.g. %s -> %s) in %s",
             renamed, *next((origin[k], k) for k in sd if k != origin[k]),
             path)
  log.info("converted torchvision %s (%d tensors) from %s", model,
           len(entries.used), path)
  return _finish(path, model, depth, params, stats, {
      "source": "torchvision", "renamed_keys": renamed,
      "model_kwargs": {"variant": "torchvision", "input_norm": "torch"}})


SOURCES = {"keras": convert_keras, "torchvision": convert_torchvision}
