"""Inception-ResNet-V2's converter: Keras weights, by an explicit map.

Sources: **Keras legacy HDF5**
(`inception_resnet_v2_weights_tf_dim_ordering_tf_kernels[_notop].h5`, what
`keras.applications` downloads) and **Keras 3** `.weights.h5`.

Keras names some layers (`block35_1_conv`, ..., `conv_7b`, `conv_7b_bn`,
`predictions`) and leaves the other 203 convolutions and their BatchNorms
anonymous (`conv2d_N`, `batch_normalization_N`):

* a legacy file keeps those layer names: the named ones map by name, and an
  anonymous one's numeric suffix is its creation rank (its offset depends on
  what the writing session built before, so ranks are sorted, not read), so
  the k-th anonymous conv is `LEGACY_CONV_ORDER[k]` and pairs with the k-th
  anonymous BatchNorm;
* a Keras 3 `.weights.h5` renames every layer by its type and its rank in
  `model.layers` (the functional graph's order): `conv2d_j` is the j-th
  Conv2D of all 244, named ones included (`KERAS3_CONV_ORDER[j]`), and
  `batch_normalization_j` the j-th BatchNorm (`KERAS3_BN_ORDER[j]`). The
  per-block orders were read off keras 3.15 and are proven by the parity
  tests.

Arrays are named by Keras' blocks (`block35_1/...`), checked block by
block, then stacked into the model's scanned groups (`REPEATED`).
"""

from __future__ import annotations

import functools
import logging
import os
import re
from typing import Any, Sequence

from cxr_jax.models.inception_resnet_v2 import (REPEATED, REPEATS, STEM,
                                              InceptionResNetV2)
from cxr_jax.weights.common import (ConversionError, Tree, checked_variables,
                                    expected_variables, fold_keras_conv_bn,
                                    read_keras_layers, sort_keras_layers)

log = logging.getLogger(__name__)

MODEL = "inception_resnet_v2"

# Each block's conv-BN units in Keras' creation order (keras/applications/
# inception_resnet_v2.py); "conv" is a residual block's biased up conv.
_CREATION = {
    "mixed_5b": ("branch0", "branch1_0", "branch1_1", "branch2_0",
                 "branch2_1", "branch2_2", "branch_pool"),
    "block35": ("branch0", "branch1_0", "branch1_1", "branch2_0",
                "branch2_1", "branch2_2"),
    "mixed_6a": ("branch0", "branch1_0", "branch1_1", "branch1_2"),
    "block17": ("branch0", "branch1_0", "branch1_1", "branch1_2"),
    "mixed_7a": ("branch0_0", "branch0_1", "branch1_0", "branch1_1",
                 "branch2_0", "branch2_1", "branch2_2"),
    "block8": ("branch0", "branch1_0", "branch1_1", "branch1_2"),
}
# The same convolutions in Keras 3's `model.layers` order: deepest first
# (farthest from the block's concatenation), ties in creation order; a
# residual block's up conv comes last.
_GRAPH = {
    "mixed_5b": ("branch2_0", "branch1_0", "branch2_1", "branch0",
                 "branch1_1", "branch2_2", "branch_pool"),
    "block35": ("branch2_0", "branch1_0", "branch2_1", "branch0",
                "branch1_1", "branch2_2", "conv"),
    "mixed_6a": ("branch1_0", "branch1_1", "branch0", "branch1_2"),
    "block17": ("branch1_0", "branch1_1", "branch0", "branch1_2", "conv"),
    "mixed_7a": ("branch2_0", "branch0_0", "branch1_0", "branch2_1",
                 "branch0_1", "branch1_1", "branch2_2"),
    "block8": ("branch1_0", "branch1_1", "branch0", "branch1_2", "conv"),
}
_REDUCTION_AFTER = {"block35": "mixed_6a", "block17": "mixed_7a"}


def _order(table) -> tuple[str, ...]:
  """Our module paths of the convolutions in `table`'s per-block order."""
  order = [name for name, *_ in STEM]
  order += [f"mixed_5b/{c}" for c in table["mixed_5b"]]
  for block_type, repeats, _ in REPEATS:
    for i in range(1, repeats + 1):
      order += [f"{block_type}_{i}/{c}" for c in table[block_type]]
    if block_type in _REDUCTION_AFTER:
      red = _REDUCTION_AFTER[block_type]
      order += [f"{red}/{c}" for c in table[red]]
  return tuple(order)


# Legacy: the anonymous conv-BN units in creation order (a conv's BN has
# the same rank).
LEGACY_CONV_ORDER = _order(_CREATION)
# Keras 3: all Conv2D layers, and the BatchNorms (every conv but the up convs).
KERAS3_CONV_ORDER = _order(_GRAPH) + ("conv_7b",)
KERAS3_BN_ORDER = tuple(p for p in KERAS3_CONV_ORDER
                        if not p.endswith("/conv"))
UP_CONVS = tuple(p for p in KERAS3_CONV_ORDER if p.endswith("/conv"))
assert len(LEGACY_CONV_ORDER) == 203 and len(UP_CONVS) == 40
assert set(LEGACY_CONV_ORDER) | {"conv_7b"} == set(KERAS3_BN_ORDER)

_NAMED_UP = re.compile(r"^(block35|block17|block8)_(\d+)_conv$")
_AUTO_CONV = re.compile(r"^conv2d(_\d+)?$")
_AUTO_BN = re.compile(r"^batch_normalization(_\d+)?$")


@functools.lru_cache(maxsize=8)
def _expected(num_classes: int | None) -> tuple[dict, dict]:
  """(params, batch_stats) shapes by flat path; no head when `num_classes`
  is None (a notop file)."""
  model = InceptionResNetV2(num_classes=num_classes or 1)
  return expected_variables(model, 299, head=num_classes is not None)


def _legacy_pairs(path, convs, bns) -> tuple[dict, dict]:
  """{our conv path: file conv layer}, {our conv path: file BN layer};
  `convs` and `bns` in creation-rank order."""
  conv_of, bn_of = {}, {}
  auto_convs = [c for c in convs if _AUTO_CONV.match(c)]
  auto_bns = [b for b in bns if _AUTO_BN.match(b)]
  if len(auto_convs) != len(LEGACY_CONV_ORDER) or len(auto_bns) != len(
      LEGACY_CONV_ORDER):
    raise ConversionError(
        f"{path} (legacy layout): found {len(auto_convs)} anonymous "
        f"convolutions (conv2d_N) and {len(auto_bns)} BatchNorm layers "
        f"(batch_normalization_N); InceptionResNetV2 has "
        f"{len(LEGACY_CONV_ORDER)} of each")
  conv_of.update(zip(LEGACY_CONV_ORDER, auto_convs))
  bn_of.update(zip(LEGACY_CONV_ORDER, auto_bns))
  for c in convs:
    m = _NAMED_UP.match(c)
    if m:
      conv_of[f"{m.group(1)}_{m.group(2)}/conv"] = c
  if "conv_7b" in convs:
    conv_of["conv_7b"] = "conv_7b"
  if "conv_7b_bn" in bns:
    bn_of["conv_7b"] = "conv_7b_bn"
  known = set(conv_of.values()) | set(bn_of.values())
  for lname in sorted(set(convs) | set(bns)):
    if lname not in known:
      raise ConversionError(f"{path}: layer {lname} is not a layer of "
                            f"Keras' InceptionResNetV2")
  return conv_of, bn_of


def _keras3_pairs(path, convs, bns) -> tuple[dict, dict]:
  if len(convs) != len(KERAS3_CONV_ORDER) or len(bns) != len(KERAS3_BN_ORDER):
    raise ConversionError(
        f"{path} (keras3 layout): found {len(convs)} convolutions and "
        f"{len(bns)} BatchNorm layers; InceptionResNetV2 has "
        f"{len(KERAS3_CONV_ORDER)} and {len(KERAS3_BN_ORDER)}")
  return (dict(zip(KERAS3_CONV_ORDER, convs)),
          dict(zip(KERAS3_BN_ORDER, bns)))


def convert_keras(path: str, model: str = MODEL
                  ) -> tuple[Tree, dict[str, Any]]:
  """Converts a Keras InceptionResNetV2 weights file (legacy .h5 or
  .weights.h5, with or without the 'predictions' head)."""
  layout, layers = read_keras_layers(path)
  convs, bns, dense = sort_keras_layers(layers, log, conv_bias=True)
  if len(dense) > 1:
    raise ConversionError(f"{path}: more than one dense layer: {dense}")
  pairs = _legacy_pairs if layout == "legacy" else _keras3_pairs
  conv_of, bn_of = pairs(path, convs, bns)
  params, stats = {}, {}
  for ours, lname in conv_of.items():
    arrays = [a for _, a in layers[lname]]
    if ours.endswith("/conv"):  # up conv: kernel and bias, no BatchNorm
      if len(arrays) != 2:
        raise ConversionError(f"{path}: {lname} (as {ours}) should hold a "
                              f"kernel and a bias, has {len(arrays)} arrays")
      params[f"{ours}/kernel"], params[f"{ours}/bias"] = arrays
      continue
    if len(arrays) != 1:
      raise ConversionError(f"{path}: {lname} (as {ours}) should hold only a "
                            f"kernel (no bias), has {len(arrays)} arrays")
    if ours not in bn_of:
      raise ConversionError(f"{path}: no BatchNorm layer for {lname} "
                            f"(as {ours}); expected conv_7b_bn")
    fold_keras_conv_bn(path, layers, ours, lname, bn_of[ours], params, stats)
  if dense:
    (_, kernel), (_, bias) = layers[dense[0]]
    params["head/kernel"], params["head/bias"] = kernel, bias
  variables, num_classes = checked_variables(
      path, params, stats, _expected, f"InceptionResNetV2 ({layout} layout)",
      repeated=REPEATED)
  meta = {"source": "keras", "layout": layout,
          "input": os.path.basename(path), "num_classes": num_classes,
          "model": MODEL, "model_kwargs": {"input_norm": "inception"}}
  log.info("converted %d Keras convolutions%s from %s", len(conv_of),
           f" and a {num_classes}-way head" if dense else "", path)
  return variables, meta


MODELS: Sequence[str] = (MODEL,)
SOURCES = {"keras": convert_keras}
