"""VGG16/VGG19 converters: the convolutions of Keras and torchvision weights.

Our VGG keeps the thirteen (VGG16) or sixteen (VGG19) convolutions, named as
Keras names them (`block1_conv1` ... `block5_conv4`), and puts one linear head
on the globally pooled block5_pool map (`cxr_jax.models.vgg`). The original
fc6/fc7 and the 1000-way layer on fc7 have no place in it: the converters
skip them and log each by name.

Sources:

* **Keras** legacy `.h5` (`vgg16_weights_tf_dim_ordering_tf_kernels[_notop]`;
  layers `block1_conv1`, ..., `fc1`, `fc2`, `predictions`) and Keras 3
  `.weights.h5`, which names layers by class and rank (`conv2d_4`, `dense_1`)
  in network order. A dense layer that reads the 512 pooled channels (a model
  built with `include_top=False, pooling='avg'` and a classifier on top) is
  the head; dense layers on the flattened map or on fc7 are skipped.
* **torchvision** state dicts: `features.0`, `features.2`, ... are the
  convolutions in order (ReLUs and pools hold no weights). `classifier.0/3/6`
  (fc6, fc7, fc8) are skipped; a Linear on the 512 pooled channels
  (`classifier.weight` of shape (n, 512), the usual replacement head when
  `avgpool` becomes a 1x1 pool) is the head.

Keras weights expect 'caffe' inputs (BGR, mean subtracted) and torchvision's
'torch' inputs; each converter records its `input_norm`.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from typing import Any

import numpy as np

from cxr_jax.models.vgg import BLOCK_CONFIGS, VGG, WIDTHS, conv_names
from cxr_jax.weights.common import (ConversionError, StateDictReader, Tree,
                                    checked_variables, creation_rank,
                                    expected_variables, load_torch_state_dict,
                                    read_keras_layers)

log = logging.getLogger(__name__)

MODELS = tuple(f"vgg{d}" for d in BLOCK_CONFIGS)
# Channels of block5_pool: a dense layer reading this many inputs is the head.
POOLED_CHANNELS = WIDTHS[-1]


def _depth(path: str, model: str) -> int:
  if model not in MODELS:
    raise ConversionError(f"{path}: the VGG converter converts {MODELS}, "
                          f"not {model!r}")
  return int(model[len("vgg"):])


def torchvision_indices(depth: int) -> dict[int, str]:
  """`features` index of each convolution in torchvision's Sequential
  (conv, ReLU, ..., pool per block) -> our name."""
  out, index = {}, 0
  names = iter(conv_names(depth))
  for n in BLOCK_CONFIGS[depth]:
    for _ in range(n):
      out[index] = next(names)
      index += 2  # the conv and its ReLU
    index += 1  # the block's max pool
  return out


@functools.lru_cache(maxsize=None)
def _expected(depth: int, num_classes: int | None) -> tuple[dict, dict]:
  """(params, batch_stats: none) shapes; without `head` for a file without
  one."""
  model = VGG(num_classes=num_classes or 1, depth=depth)
  return expected_variables(model, 32, head=num_classes is not None)


def _finish(path: str, model: str, depth: int, params: dict,
            meta: dict[str, Any]) -> tuple[Tree, dict[str, Any]]:
  variables, num_classes = checked_variables(
      path, params, {}, functools.partial(_expected, depth),
      f"{model}'s parameters")
  return variables, {**meta, "input": os.path.basename(path),
                     "num_classes": num_classes, "model": model}


def _head_or_skip(path: str, name: str, kernel: np.ndarray, inputs: int,
                  head: list[str], skipped: list[str]) -> bool:
  """Whether dense layer `name` (reading `inputs` features) is the head;
  anything else (fc6, fc7, the 1000-way layer on fc7) is logged and skipped."""
  if inputs == POOLED_CHANNELS:
    if head:
      raise ConversionError(f"{path}: dense layers {head[0]} and {name} both "
                            f"read the pooled {POOLED_CHANNELS} channels; "
                            f"which is the head?")
    head.append(name)
    return True
  log.info("skipped %s %s: a fully connected layer on %d inputs (fc6/fc7 "
           "or the classifier on fc7), not on the pooled map", name,
           tuple(kernel.shape), inputs)
  skipped.append(name)
  return False


# --------------------------------------------------------------------------
# Keras
# --------------------------------------------------------------------------

def convert_keras(path: str, model: str = "vgg16"
                  ) -> tuple[Tree, dict[str, Any]]:
  """Converts a Keras VGG16/19 weights file (legacy .h5 or .weights.h5)."""
  depth = _depth(path, model)
  layout, layers = read_keras_layers(path)
  ranks = {name: [a.ndim for _, a in w] for name, w in layers.items()}
  convs = [n for n, r in ranks.items() if r == [4, 1]]
  dense = [n for n, r in ranks.items() if r == [2, 1]]
  for name in sorted(set(layers) - set(convs) - set(dense)):
    log.info("skipped Keras layer %s (arrays of rank %s)", name, ranks[name])
  ours = conv_names(depth)
  if "block1_conv1" in layers:  # named layers (every legacy .h5)
    missing = [n for n in ours if n not in layers]
    extra = sorted(set(convs) - set(ours))
    if missing or extra:
      raise ConversionError(
          f"{path} ({layout} layout) does not hold {model}'s convolutions: "
          f"missing {missing[:4]}, not in {model} {extra[:4]}")
    pairs = [(n, n) for n in ours]
    dense.sort(key=list(layers).index)
  else:  # Keras 3 .weights.h5: class names and ranks in network order
    convs.sort(key=creation_rank)
    dense.sort(key=creation_rank)
    if len(convs) != len(ours):
      raise ConversionError(f"{path} ({layout} layout): {len(convs)} "
                            f"convolutions; {model} has {len(ours)}")
    pairs = list(zip(convs, ours))
  params = {}
  for name, our in pairs:
    (_, kernel), (_, bias) = layers[name]
    params[f"{our}/kernel"], params[f"{our}/bias"] = kernel, bias
  head, skipped = [], []
  for name in dense:
    (_, kernel), (_, bias) = layers[name]
    if _head_or_skip(path, name, kernel, kernel.shape[0], head, skipped):
      params["head/kernel"], params["head/bias"] = kernel, bias
  log.info("converted %d Keras convolutions%s from %s", len(pairs),
           f" and the head {head[0]}" if head else "", path)
  return _finish(path, model, depth, params, {
      "source": "keras", "layout": layout, "skipped": skipped,
      "model_kwargs": {"input_norm": "caffe"}})


# --------------------------------------------------------------------------
# torchvision
# --------------------------------------------------------------------------

def convert_torchvision(path: str, model: str = "vgg16"
                        ) -> tuple[Tree, dict[str, Any]]:
  """Converts a torchvision VGG16/19 state dict (its convolutions, and a
  Linear on the pooled map if it has one)."""
  depth = _depth(path, model)
  sd = load_torch_state_dict(path)
  if "features.0.weight" not in sd:
    raise ConversionError(f"{path} is not a torchvision VGG state dict: no "
                          f"'features.0.weight' (its first keys: "
                          f"{list(sd)[:3]})")
  if "features.1.running_mean" in sd:
    raise ConversionError(f"{path} is a VGG with BatchNorm (vgg16_bn / "
                          f"vgg19_bn); {model} has none")
  convs = sorted(int(m.group(1)) for m in (
      re.fullmatch(r"features\.(\d+)\.weight", k) for k in sd) if m)
  expected = list(torchvision_indices(depth))
  if convs != expected:
    other = [f"vgg{d}" for d in BLOCK_CONFIGS
             if list(torchvision_indices(d)) == convs]
    raise ConversionError(
        f"{path}: convolutions at features.{convs}, but {model}'s are at "
        f"features.{expected}" + (f" (a {other[0]} file)" if other else ""))
  entries = StateDictReader(path, sd, hint=f" for {model}")
  params = {}
  for index, ours in torchvision_indices(depth).items():
    params[f"{ours}/kernel"] = entries.take(
        f"features.{index}.weight").transpose(2, 3, 1, 0)  # OIHW -> HWIO
    params[f"{ours}/bias"] = entries.take(f"features.{index}.bias")
  head, skipped = [], []
  # `classifier` (one Linear) or `classifier.<i>` (a Sequential), in order.
  linears = sorted((k[:-len(".weight")] for k in sd
                    if re.fullmatch(r"classifier(\.\d+)?\.weight", k)),
                   key=lambda k: int(k.partition(".")[2] or -1))
  for name in linears:
    weight = entries.take(f"{name}.weight")
    bias = entries.take(f"{name}.bias")
    if _head_or_skip(path, name, weight, weight.shape[1], head, skipped):
      params["head/kernel"], params["head/bias"] = weight.T, bias
  extra = entries.left_over()
  if extra:
    raise ConversionError(f"{path}: entries {extra[:4]} are not part of "
                          f"{model} (another model's file?)")
  log.info("converted torchvision %s (%d tensors) from %s", model,
           len(entries.used), path)
  return _finish(path, model, depth, params, {
      "source": "torchvision", "skipped": skipped,
      "model_kwargs": {"input_norm": "torch"}})


SOURCES = {"keras": convert_keras, "torchvision": convert_torchvision}
