"""BN-Inception's converter: the Caffe BN-Inception as `pretrainedmodels`
stores it (`bn_inception-52deb4733.pth`, a PyTorch state dict), by an
explicit name map onto `cxr_jax.models.bn_inception` (variant 'caffe').

Source **pretrainedmodels**: every convolution `X` is `X.weight`/`X.bias`
and its BatchNorm `X_bn.weight/bias/running_mean/running_var`, named after
the Caffe layers. The stem's `conv1_7x7_s2`, `conv2_3x3_reduce`, `conv2_3x3`
keep their names; a block's `inception_3a_double_3x3_1` is our
`inception_3a/double_3x3_1`:

  X.weight (O, I, kh, kw) -> X/conv/kernel (kh, kw, I, O)
  X.bias                  -> X/conv/bias
  X_bn.weight, X_bn.bias  -> X/bn/scale, X/bn/bias
  X_bn.running_mean/var   -> batch_stats X/bn/mean, X/bn/var
  last_linear             -> head

`module.` prefixes (DataParallel) are dropped; `num_batches_tracked`
counters are logged and skipped. The converted file records
`variant='caffe'` and `input_norm='caffe_bn_inception'` (BGR, 0..255, minus
(104, 117, 128)), so the converted model computes, for x in [-1, 1],
`flax(x) == torch_model(bgr((x + 1) * 127.5) - (104, 117, 128))`.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, Iterator

from cxr_jax.models.bn_inception import BLOCKS, VARIANTS, BNInception
from cxr_jax.weights.common import (ConversionError, StateDictReader, Tree,
                                    checked_variables, expected_variables,
                                    load_torch_state_dict)

log = logging.getLogger(__name__)

MODEL = "bn_inception"
VARIANT = "caffe"
_STEM = ("conv1_7x7_s2", "conv2_3x3_reduce", "conv2_3x3")
_MIXED = ("1x1", "3x3_reduce", "3x3", "double_3x3_reduce", "double_3x3_1",
          "double_3x3_2", "pool_proj")
_REDUCTION = ("3x3_reduce", "3x3", "double_3x3_reduce", "double_3x3_1",
              "double_3x3_2")


def conv_names() -> Iterator[tuple[str, str]]:
  """(pretrainedmodels name, our path) of every convolution, in order."""
  for name in _STEM:
    yield name, name
  for block, kind, _ in BLOCKS:
    for branch in _MIXED if kind == "mixed" else _REDUCTION:
      yield f"{block}_{branch}", f"{block}/{branch}"


@functools.lru_cache(maxsize=8)
def _expected(num_classes: int) -> tuple[dict[str, tuple[int, ...]],
                                         dict[str, tuple[int, ...]]]:
  """(params, batch_stats) shapes of the Caffe variant, by flat path."""
  return expected_variables(
      BNInception(num_classes=num_classes, variant=VARIANT), 224)


def convert_pretrainedmodels(path: str, model: str = MODEL
                             ) -> tuple[Tree, dict[str, Any]]:
  """Converts a pretrainedmodels `bninception` state dict (see module
  docstring)."""
  if model != MODEL:
    raise ConversionError(f"{path}: the pretrainedmodels BN-Inception "
                          f"converter converts {MODEL!r}, not {model!r}")
  sd = StateDictReader(path, load_torch_state_dict(path), "pretrainedmodels",
                       " (BN-Inception needs it; is this a bninception "
                       "state dict?)")
  params, stats = {}, {}
  for theirs, ours in conv_names():
    params[f"{ours}/conv/kernel"] = sd.kernel(f"{theirs}.weight")
    params[f"{ours}/conv/bias"] = sd.take(f"{theirs}.bias")
    sd.load_batch_norm(f"{theirs}_bn", f"{ours}/bn", params, stats)
  head = sd.take("last_linear.weight")
  if head.ndim != 2:
    raise ConversionError(f"{path}: last_linear.weight has shape "
                          f"{head.shape}; a linear layer's is 2-D")
  params["head/kernel"] = head.T
  params["head/bias"] = sd.take("last_linear.bias")
  sd.skip_left_over(log, " (a BatchNorm step counter)",
                    refuse=lambda key: True, owner="BN-Inception",
                    hint="(another pretrainedmodels network?)")
  variables, num_classes = checked_variables(
      path, params, stats, _expected, f"{MODEL} (variant {VARIANT!r})")
  log.info("converted pretrainedmodels bninception (%d tensors used) from %s",
           len(sd.used), path)
  meta = {"source": "pretrainedmodels", "input": os.path.basename(path),
          "num_classes": num_classes, "model": MODEL,
          "model_kwargs": {"variant": VARIANT,
                           "input_norm": VARIANTS[VARIANT].input_norm}}
  return variables, meta


# source -> converter(path, model, **options); `cxr_jax.weights.convert`
# dispatches on the model's family.
MODELS = (MODEL,)
SOURCES = {"pretrainedmodels": convert_pretrainedmodels}
