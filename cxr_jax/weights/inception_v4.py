"""Inception V4's converters: timm and pretrainedmodels state dicts.

Both files use the same keys (`cxr_jax.parity.torch_inception_v4`):
`features.N.<path>.conv.weight`, `features.N.<path>.bn.{weight, bias,
running_mean, running_var, num_batches_tracked}` and `last_linear.{weight,
bias}`. `TORCH_TO_OURS` maps every BasicConv2d explicitly: `features.0-2`
are the stem convs, `features.3-21` the blocks `Mixed_3a` ... `Mixed_7d`, and
inside a block `branch1.0` is our `branch1_0` and the pool branch's
`branch3.1` our `branch_pool`. PyTorch's affine BatchNorm maps onto ours
(which has a scale) as is; `num_batches_tracked` is skipped.

* **timm** (`inception_v4.tf_in1k`): 1000 classes.
* **pretrainedmodels** (`inceptionv4-8e4777a0.pth`): 1001 classes, the
  first being TF-slim's background class. `drop_background=True` drops it,
  as `pretrainedmodels.inceptionv4(pretrained='imagenet')` does.

A file without `last_linear` (timm with num_classes=0) converts without a
head. DataParallel's 'module.' prefix is removed on reading. Both sources
expect inputs normalised with mean 0.5 and std 0.5, i.e. our [-1, 1]
(`input_norm='inception'`); the equality statement, for x in [-1, 1]:
`flax(x) == torch_model(x)` (pretrainedmodels' fixed 8x8 head pool is global
only at 299 px, where it equals our global average).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, Sequence

from cxr_jax.models.inception_v4 import BLOCKS, REPEATED, STEM, InceptionV4
from cxr_jax.weights.common import (ConversionError, StateDictReader, Tree,
                                    checked_variables, expected_variables,
                                    load_torch_state_dict)

log = logging.getLogger(__name__)

MODEL = "inception_v4"

# Each block's conv-BN units by torch path inside the block, in order.
_BLOCK_CONVS: dict[str, tuple[str, ...]] = {
    "Mixed3a": ("conv",),
    "Mixed4a": ("branch0.0", "branch0.1", "branch1.0", "branch1.1",
                "branch1.2", "branch1.3"),
    "Mixed5a": ("conv",),
    "InceptionA": ("branch0", "branch1.0", "branch1.1", "branch2.0",
                   "branch2.1", "branch2.2", "branch3.1"),
    "ReductionA": ("branch0", "branch1.0", "branch1.1", "branch1.2"),
    "InceptionB": ("branch0", "branch1.0", "branch1.1", "branch1.2",
                   "branch2.0", "branch2.1", "branch2.2", "branch2.3",
                   "branch2.4", "branch3.1"),
    "ReductionB": ("branch0.0", "branch0.1", "branch1.0", "branch1.1",
                   "branch1.2", "branch1.3"),
    "InceptionC": ("branch0", "branch1_0", "branch1_1a", "branch1_1b",
                   "branch2_0", "branch2_1", "branch2_2", "branch2_3a",
                   "branch2_3b", "branch3.1"),
}


def _our_name(torch_path: str) -> str:
  """`branch1.0` -> `branch1_0`; the pool branch's conv, `branch3.1` (after
  its pool, `branch3.0`), is our `branch_pool`."""
  if torch_path == "branch3.1":
    return "branch_pool"
  return torch_path.replace(".", "_")


def _torch_to_ours() -> tuple[tuple[str, str], ...]:
  pairs = [(f"features.{i}", name) for i, (name, *_) in enumerate(STEM)]
  for j, (name, block) in enumerate(BLOCKS, start=len(STEM)):
    pairs += [(f"features.{j}.{t}", f"{name}/{_our_name(t)}")
              for t in _BLOCK_CONVS[block.__name__]]
  return tuple(pairs)


# (torch BasicConv2d prefix, our ConvBN path) for all 149 of them.
TORCH_TO_OURS = _torch_to_ours()
assert len(TORCH_TO_OURS) == 149


@functools.lru_cache(maxsize=8)
def _expected(num_classes: int | None) -> tuple[dict, dict]:
  model = InceptionV4(num_classes=num_classes or 1)
  return expected_variables(model, 299, head=num_classes is not None)


def _convert(path: str, source: str, drop_background: bool = False
             ) -> tuple[Tree, dict[str, Any]]:
  sd = StateDictReader(path, load_torch_state_dict(path), source,
                       " (is this an Inception V4 state dict?)")
  params, stats = {}, {}
  for t, ours in TORCH_TO_OURS:
    params[f"{ours}/conv/kernel"] = sd.kernel(f"{t}.conv.weight",
                                              "expected a 4-d OIHW kernel")
    sd.load_batch_norm(f"{t}.bn", f"{ours}/bn", params, stats)
  if "last_linear.weight" in sd:
    kernel = sd.take("last_linear.weight").T
    bias = sd.take("last_linear.bias")
    if drop_background:
      if bias.shape[0] != 1001:
        raise ConversionError(
            f"{path}: drop_background removes TF-slim's background class "
            f"from a 1001-way last_linear; this one has {bias.shape[0]}")
      kernel, bias = kernel[:, 1:], bias[1:]
    params["head/kernel"], params["head/bias"] = kernel, bias
  sd.skip_left_over(log)
  variables, num_classes = checked_variables(
      path, params, stats, _expected, f"InceptionV4 ({source})",
      repeated=REPEATED)
  meta = {"source": source, "input": os.path.basename(path),
          "num_classes": num_classes, "drop_background": drop_background,
          "model": MODEL, "model_kwargs": {"input_norm": "inception"}}
  log.info("converted %s inception_v4 (%d tensors used%s) from %s", source,
           len(sd.used), f", {num_classes}-way head" if num_classes else "",
           path)
  return variables, meta


def convert_timm(path: str, model: str = MODEL
                 ) -> tuple[Tree, dict[str, Any]]:
  """Converts a timm `inception_v4` state dict."""
  return _convert(path, "timm")


def convert_pretrainedmodels(path: str, model: str = MODEL,
                             drop_background: bool = False
                             ) -> tuple[Tree, dict[str, Any]]:
  """Converts a pretrainedmodels `inceptionv4` state dict (see the module
  docstring for `drop_background`)."""
  return _convert(path, "pretrainedmodels", drop_background)


MODELS: Sequence[str] = (MODEL,)
SOURCES = {"timm": convert_timm, "pretrainedmodels": convert_pretrainedmodels}
