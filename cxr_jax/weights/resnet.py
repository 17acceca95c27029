"""ResNet-50/101/152 converters: Keras and torchvision weights, by explicit
name maps onto `cxr_jax.models.resnet` (torchvision's module names).

Sources:

* **Keras** `keras.applications.ResNet50/101/152` files, both layouts, into
  `variant='keras'` (v1: stride on the first 1x1, convolution biases):

  - legacy HDF5 (`resnet50_weights_tf_dim_ordering_tf_kernels.h5`, what
    `keras.applications` downloads, and `model.save_weights('x.h5')`) keeps
    the layer names: `conv1_conv`/`conv1_bn` are `conv1`/`bn1`,
    `conv{s}_block{b}_{j}_conv`/`_bn` are `layer{s-1}/{b-1}/conv{j}`/`bn{j}`
    (j = 1..3), `_0_conv`/`_0_bn` (the projection shortcut) are
    `layer{s-1}/{b-1}/downsample/conv`/`bn`, and `predictions` is `head`.
  - Keras 3 `.weights.h5` names layers by class and rank in `model.layers`
    (`conv2d`, `conv2d_1`, ..., `batch_normalization_k`, `dense`). That order
    is the functional graph's: the stem, then per block `_1, _2, _3`, except
    that a first block runs its shortcut after `_2`: `_1, _2, _0, _3` (read
    off keras 3.15's ResNet50 and proven by the parity tests, where `_0` and
    `_3` of conv2 have the same shape and only the numbers tell them apart).

  Keras' BatchNorm has gamma, our BatchNorm has a scale: nothing is folded.
  The file's ResNet must have the model's depth; a file with another number
  of layers is an error that names the depth it fits.
* **torchvision** `resnet50/101/152` state dicts (v1.5, no convolution
  biases) into `variant='torchvision'`: `conv1.weight` -> `conv1/kernel`,
  `layer1.0.bn1.weight` -> `layer1/0/bn1/scale`, `downsample.0` ->
  `downsample/conv`, `downsample.1` -> `downsample/bn`, `fc` -> `head`.
  `num_batches_tracked` entries are logged and skipped.

Both write `model_kwargs` with the variant and the input normalisation
('caffe' for Keras, 'torch' for torchvision) that make the converted model
compute what the source computes on the same image.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from typing import Any, Iterator

import numpy as np

from cxr_jax.models.resnet import MODELS as _MODELS
from cxr_jax.models.resnet import REPEATED, STAGE_BLOCKS, VARIANTS, ResNet
from cxr_jax.weights.common import (ConversionError, Shapes,
                                    StateDictReader, Tree, checked_variables,
                                    creation_rank, expected_variables,
                                    keras_bn, load_torch_state_dict,
                                    read_keras_layers)

log = logging.getLogger(__name__)


def _depth(path: str, model: str) -> int:
  if model not in _MODELS:
    raise ConversionError(f"{path}: the ResNet converters convert "
                          f"{sorted(_MODELS)}, not {model!r}")
  return _MODELS[model][1]["depth"]


def _units(depth: int, keras3_order: bool = False
           ) -> Iterator[tuple[str, str, str, str]]:
  """(Keras conv, Keras bn, our conv, our bn) of every conv+BN pair, in
  Keras' creation order or (keras3_order) its `model.layers` order."""
  yield "conv1_conv", "conv1_bn", "conv1", "bn1"
  for s, blocks in enumerate(STAGE_BLOCKS[depth]):
    for b in range(blocks):
      keras = f"conv{s + 2}_block{b + 1}"
      ours = f"layer{s + 1}/{b}"
      order = (0, 1, 2, 3) if b == 0 else (1, 2, 3)
      if keras3_order and b == 0:
        order = (1, 2, 0, 3)
      for j in order:
        if j == 0:
          yield (f"{keras}_0_conv", f"{keras}_0_bn",
                 f"{ours}/downsample/conv", f"{ours}/downsample/bn")
        else:
          yield (f"{keras}_{j}_conv", f"{keras}_{j}_bn", f"{ours}/conv{j}",
                 f"{ours}/bn{j}")


def _units_count(depth: int) -> int:
  return 1 + 3 * sum(STAGE_BLOCKS[depth]) + len(STAGE_BLOCKS[depth])


@functools.lru_cache(maxsize=12)
def _expected(model: str, variant: str, num_classes: int | None
              ) -> tuple[Shapes, Shapes]:
  """(params, batch_stats) shapes of `model` by flat path, no compute;
  without the head for a notop file (num_classes None)."""
  net = ResNet(depth=_MODELS[model][1]["depth"], variant=variant,
               num_classes=num_classes or 1)
  return expected_variables(net, 64, head=num_classes is not None)


def _finish(path: str, model: str, variant: str, params: dict, stats: dict
            ) -> tuple[Tree, int | None]:
  """Checked float32 variables and the head's class count (None: no head)."""
  return checked_variables(
      path, params, stats, functools.partial(_expected, model, variant),
      f"{model} (variant {variant!r})",
      repeated=REPEATED[_MODELS[model][1]["depth"]])


def _meta(source: str, path: str, model: str, variant: str,
          num_classes: int | None, **extra) -> dict[str, Any]:
  return {"source": source, **extra, "input": os.path.basename(path),
          "num_classes": num_classes, "model": model,
          "model_kwargs": {"variant": variant,
                           "input_norm": VARIANTS[variant].input_norm}}


# --------------------------------------------------------------------------
# Keras
# --------------------------------------------------------------------------

def _keras_conv(path: str, lname: str, weights
                ) -> tuple[np.ndarray, np.ndarray]:
  """(kernel, bias) of a Keras Conv2D; names where the file has them."""
  if len(weights) != 2:
    raise ConversionError(
        f"{path}: convolution {lname} has {len(weights)} arrays; a Keras "
        f"ResNet v1 convolution has a kernel and a bias")
  named = {("bias" if "bias" in w else "kernel" if "kernel" in w else i): a
           for i, (w, a) in enumerate(weights)}
  if set(named) != {"kernel", "bias"}:  # Keras 3 layout: positional
    named = {"kernel": weights[0][1], "bias": weights[1][1]}
  if named["kernel"].ndim != 4 or named["bias"].ndim != 1:
    raise ConversionError(
        f"{path}: layer {lname} holds arrays of shapes "
        f"{[a.shape for _, a in weights]}, not a 2-D convolution")
  return named["kernel"], named["bias"]


_KERAS3_KINDS = {"conv": r"conv2d", "bn": r"batch_normalization",
                 "dense": r"dense"}


def _keras3_layers(path: str, layers, depth: int) -> dict[str, str]:
  """{Keras layer name (as in a legacy file): Keras 3 anonymous name}."""
  found: dict[str, list[str]] = {k: [] for k in _KERAS3_KINDS}
  for lname in layers:
    for kind, stem in _KERAS3_KINDS.items():
      if re.fullmatch(rf"{stem}(_\d+)?", lname):
        found[kind].append(lname)
        break
  for names in found.values():
    names.sort(key=creation_rank)
  n = len(found["conv"])
  if n != len(found["bn"]):
    raise ConversionError(f"{path}: {n} convolutions but {len(found['bn'])} "
                          f"BatchNorm layers; a ResNet pairs them")
  _check_count(path, depth, n)
  if len(found["dense"]) > 1:
    raise ConversionError(f"{path}: more than one dense layer: "
                          f"{found['dense']}")
  names = {}
  for (kconv, kbn, _, _), conv, bn in zip(_units(depth, keras3_order=True),
                                          found["conv"], found["bn"]):
    names[kconv], names[kbn] = conv, bn
  if found["dense"]:
    names["predictions"] = found["dense"][0]
  return names


def _check_count(path: str, depth: int, convs: int) -> None:
  if convs == _units_count(depth):
    return
  fits = [f"resnet{d}" for d in STAGE_BLOCKS if _units_count(d) == convs]
  raise ConversionError(
      f"{path}: {convs} convolutions, but resnet{depth} has "
      f"{_units_count(depth)}" +
      (f"; the file fits {fits[0]} (--model {fits[0]})" if fits else
       "; not a Keras ResNet50/101/152 file"))


def convert_keras(path: str, model: str = "resnet50"
                  ) -> tuple[Tree, dict[str, Any]]:
  """Converts a Keras ResNet50/101/152 file (legacy .h5 or .weights.h5)."""
  depth = _depth(path, model)
  layout, layers = read_keras_layers(path)
  if layout == "legacy":
    convs = [n for n in layers if re.fullmatch(r"conv\d(_block\d+_\d)?_conv",
                                               n)]
    _check_count(path, depth, len(convs))
    names = {n: n for n in layers}
  else:
    names = _keras3_layers(path, layers, depth)
  used = set()

  def layer(kname: str):
    if kname not in names:
      raise ConversionError(f"{path} ({layout} layout): no layer {kname!r}; "
                            f"resnet{depth} needs it")
    used.add(names[kname])
    return names[kname], layers[names[kname]]

  params, stats = {}, {}
  for kconv, kbn, conv, bn in _units(depth):
    lname, weights = layer(kconv)
    params[f"{conv}/kernel"], params[f"{conv}/bias"] = _keras_conv(
        path, lname, weights)
    lname, weights = layer(kbn)
    gamma, beta, mean, var = keras_bn(lname, weights)
    if gamma is None:
      raise ConversionError(f"{path}: BatchNorm {lname} ({kbn}) has no gamma;"
                            f" Keras' ResNet BatchNorm layers have one")
    params[f"{bn}/scale"], params[f"{bn}/bias"] = gamma, beta
    stats[f"{bn}/mean"], stats[f"{bn}/var"] = mean, var
  has_head = "predictions" in names
  if has_head:
    lname, weights = layer("predictions")
    if len(weights) != 2:
      raise ConversionError(f"{path}: dense layer {lname} has "
                            f"{len(weights)} arrays; expected kernel, bias")
    (_, kernel), (_, bias) = weights
    params["head/kernel"], params["head/bias"] = kernel, bias
  for lname in sorted(set(layers) - used):
    log.info("skipped Keras layer %s (%d arrays)", lname, len(layers[lname]))
  variables, num_classes = _finish(path, model, "keras", params, stats)
  log.info("converted Keras %s (%s layout, %d layers)%s from %s", model,
           layout, len(used), f" with a {num_classes}-way head"
           if has_head else "", path)
  return variables, _meta("keras", path, model, "keras", num_classes,
                          layout=layout)


# --------------------------------------------------------------------------
# torchvision
# --------------------------------------------------------------------------

def _torchvision_units(depth: int) -> Iterator[tuple[str, str, str, str]]:
  """(torch conv, torch bn, our conv, our bn) in torchvision's order."""
  yield "conv1", "bn1", "conv1", "bn1"
  for s, blocks in enumerate(STAGE_BLOCKS[depth]):
    for b in range(blocks):
      tv, ours = f"layer{s + 1}.{b}", f"layer{s + 1}/{b}"
      for j in (1, 2, 3):
        yield f"{tv}.conv{j}", f"{tv}.bn{j}", f"{ours}/conv{j}", f"{ours}/bn{j}"
      if b == 0:
        yield (f"{tv}.downsample.0", f"{tv}.downsample.1",
               f"{ours}/downsample/conv", f"{ours}/downsample/bn")


# Entries of a torchvision ResNet that are not ours to skip quietly.
_TORCHVISION_KEY = re.compile(r"^(conv1|bn1|layer\d+|fc)\.")


def convert_torchvision(path: str, model: str = "resnet50"
                        ) -> tuple[Tree, dict[str, Any]]:
  """Converts a torchvision `resnet50/101/152` state dict."""
  depth = _depth(path, model)
  sd = StateDictReader(path, load_torch_state_dict(path),
                       hint=f" (resnet{depth} needs it)")
  params, stats = {}, {}
  for tconv, tbn, conv, bn in _torchvision_units(depth):
    params[f"{conv}/kernel"] = sd.kernel(f"{tconv}.weight")
    sd.load_batch_norm(tbn, bn, params, stats)
  params["head/kernel"] = sd.take("fc.weight").T
  params["head/bias"] = sd.take("fc.bias")
  sd.skip_left_over(log, refuse=_TORCHVISION_KEY.match,
                    owner=f"resnet{depth}",
                    hint="(a deeper ResNet, or another torchvision model?)")
  variables, num_classes = _finish(path, model, "torchvision", params, stats)
  log.info("converted torchvision %s (%d tensors used) from %s", model,
           len(sd.used), path)
  return variables, _meta("torchvision", path, model, "torchvision",
                          num_classes)


# source -> converter(path, model, **options); `cxr_jax.weights.convert`
# dispatches on the model's family.
MODELS = tuple(_MODELS)
SOURCES = {"keras": convert_keras, "torchvision": convert_torchvision}
