"""InceptionV3's converters: Keras and torchvision weights, by explicit maps.

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
import logging
import os
from typing import Any, Mapping

import numpy as np

from cxr_jax.models.inception_v3 import BLOCKS, STEM, InceptionV3
from cxr_jax.weights.common import (IMAGENET_MEAN, IMAGENET_STD,
                                    ConversionError, StateDictReader, Tree,
                                    expected_shapes, fold_keras_conv_bn,
                                    load_torch_state_dict, read_keras_layers,
                                    sort_keras_layers, unflatten)

log = logging.getLogger(__name__)


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

# --------------------------------------------------------------------------
# Keras
# --------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _expected_kernel_shapes() -> dict[str, tuple[int, ...]]:
  """Kernel shape of every BasicConv of our model, by path (no compute)."""
  flat = expected_shapes(InceptionV3(num_classes=1), 299)
  return {p[:-len("/conv/kernel")]: v for p, v in flat.items()
          if p.endswith("/conv/kernel")}


def convert_keras(path: str, model: str = "inception_v3"
                  ) -> tuple[Tree, dict[str, Any]]:
  """Converts a Keras InceptionV3 weights file (legacy .h5 or .weights.h5)."""
  layout, layers = read_keras_layers(path)
  order = KERAS_CONV_ORDER if layout == "legacy" else KERAS3_CONV_ORDER
  expected = _expected_kernel_shapes()
  convs, bns, dense = sort_keras_layers(layers, log)
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
    fold_keras_conv_bn(path, layers, ours, conv_name, bn_name, params, stats)
  if dense:
    (_, kernel), (_, bias) = layers[dense[0]]
    params["head/kernel"], params["head/bias"] = kernel, bias
  num_classes = int(params["head/bias"].shape[0]) if dense else None
  meta = {"source": "keras", "layout": layout,
          "input": os.path.basename(path), "num_classes": num_classes,
          "model": "inception_v3",
          "model_kwargs": {"pool_include_padding": False,
                           "input_norm": "inception"}}
  log.info("converted %d Keras convolutions%s from %s", len(convs),
           f" and a {num_classes}-way head" if dense else "", path)
  return {"params": unflatten(params), "batch_stats": unflatten(stats)}, meta


# --------------------------------------------------------------------------
# torchvision
# --------------------------------------------------------------------------

def convert_torchvision(path: str, model: str = "inception_v3",
                        transform_input: bool = True
                        ) -> tuple[Tree, dict[str, Any]]:
  """Converts a torchvision `inception_v3` state dict (see module docstring)."""
  sd = StateDictReader(path, load_torch_state_dict(path))
  has_aux = any(k.startswith("AuxLogits.") for k in sd.entries)
  params, stats = {}, {}
  for ours in KERAS_CONV_ORDER + (_AUX_CONVS if has_aux else ()):
    tv = ours.replace("/", ".")
    w = sd.take(f"{tv}.conv.weight").transpose(2, 3, 1, 0)  # OIHW -> HWIO
    gamma, beta, mean, var = sd.batch_norm(f"{tv}.bn")
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
  params["head/kernel"] = sd.take("fc.weight").T
  params["head/bias"] = sd.take("fc.bias")
  if has_aux:
    params["AuxLogits/fc/kernel"] = sd.take("AuxLogits.fc.weight").T
    params["AuxLogits/fc/bias"] = sd.take("AuxLogits.fc.bias")
  sd.skip_left_over(log)
  cast = lambda t: {k: v.astype(np.float32) for k, v in t.items()}
  meta = {"source": "torchvision", "input": os.path.basename(path),
          "num_classes": int(params["head/bias"].shape[0]),
          "aux_logits": has_aux, "transform_input": transform_input,
          "model": "inception_v3",
          "model_kwargs": {"pool_include_padding": True,
                           "input_norm": "inception"}}
  log.info("converted torchvision inception_v3 (%d tensors used) from %s",
           len(sd.used), path)
  return ({"params": unflatten(cast(params)),
           "batch_stats": unflatten(cast(stats))}, meta)


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


# source -> converter(path, model, **options); `cxr_jax.weights.convert`
# dispatches on the model's family.
MODELS = ("inception_v3",)
SOURCES = {"keras": convert_keras, "torchvision": convert_torchvision}
