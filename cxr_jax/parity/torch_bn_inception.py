"""pretrainedmodels' BN-Inception, written out for the parity check.

`pretrainedmodels` cannot be imported here (it imports torchvision, which
does not install beside the CPU torch wheel), so this is the reference:
`BNInception` below is pretrainedmodels 0.7.4's
pretrainedmodels/models/bninception.py (Cadene's port of the Caffe
BN-Inception), layer for layer. Upstream spells out each of its 69
convolutions; here each `conv_bn` call is one upstream triple
(`nn.Conv2d(cin, cout, kernel_size=(k, k), stride=(s, s), padding=(p, p))`,
`nn.BatchNorm2d(cout, affine=True)`, `nn.ReLU`), and the channel table is
transcribed from upstream's `__init__`, not from our Flax model. The
attribute names, and so the state dict's keys, shapes and order, are
upstream's (the ReLUs, which hold nothing, are applied functionally).

One change: upstream's head is `AvgPool2d(7, stride=1)`, `view` and
`last_linear`, which on the 7x7 map of 224-px inputs is the global average;
at any other size its `view` hands `last_linear` the wrong width. `logits`
keeps upstream's pool on a 7x7 map and takes the global average elsewhere
(what our head does everywhere).

torch is imported inside the functions, so `import cxr_jax.parity.bn_inception`
works without it; only running a torch check needs it.
"""

from __future__ import annotations

import functools
import logging
from typing import Callable

import numpy as np

from cxr_jax.models import bn_inception
from cxr_jax.parity import common
from cxr_jax.parity.common import parameter_count

log = logging.getLogger(__name__)

PRETRAINEDMODELS_VERSION = "0.7.4"
# sum(p.numel() for p in BNInception(num_classes=1000).parameters()) of
# pretrainedmodels 0.7.4's own class (its 1000-class ImageNet model).
UPSTREAM_PARAMETERS = 11_295_240
# pretrained_settings['bninception']['imagenet']: BGR, 0..255, this mean.
MEAN_BGR = np.array([104.0, 117.0, 128.0])

# Upstream's blocks in order. 'mixed': (in, 1x1, 3x3_reduce, 3x3,
# double_3x3_reduce, double_3x3, pool_proj, pool); 'reduction': (in,
# 3x3_reduce, 3x3, double_3x3_reduce, double_3x3).
UPSTREAM_BLOCKS = (
    ("inception_3a", "mixed", (192, 64, 64, 64, 64, 96, 32, "avg")),
    ("inception_3b", "mixed", (256, 64, 64, 96, 64, 96, 64, "avg")),
    ("inception_3c", "reduction", (320, 128, 160, 64, 96)),
    ("inception_4a", "mixed", (576, 224, 64, 96, 96, 128, 128, "avg")),
    ("inception_4b", "mixed", (576, 192, 96, 128, 96, 128, 128, "avg")),
    ("inception_4c", "mixed", (576, 160, 128, 160, 128, 160, 128, "avg")),
    ("inception_4d", "mixed", (608, 96, 128, 192, 160, 192, 128, "avg")),
    ("inception_4e", "reduction", (608, 128, 192, 192, 256)),
    ("inception_5a", "mixed", (1056, 352, 192, 320, 160, 224, 128, "avg")),
    ("inception_5b", "mixed", (1024, 352, 192, 320, 192, 224, 128, "max")),
)


@functools.lru_cache(maxsize=1)
def torch_module() -> type:
  """pretrainedmodels' `BNInception` class, defined on first use."""
  import torch
  import torch.nn as nn
  import torch.nn.functional as F

  class BNInception(nn.Module):

    def __init__(self, num_classes=1000):
      super().__init__()
      self.conv_bn("conv1_7x7_s2", 3, 64, 7, stride=2, padding=3)
      self.pool1_3x3_s2 = nn.MaxPool2d((3, 3), stride=(2, 2), dilation=(1, 1),
                                       ceil_mode=True)
      self.conv_bn("conv2_3x3_reduce", 64, 64, 1)
      self.conv_bn("conv2_3x3", 64, 192, 3, padding=1)
      self.pool2_3x3_s2 = nn.MaxPool2d((3, 3), stride=(2, 2), dilation=(1, 1),
                                       ceil_mode=True)
      for name, kind, widths in UPSTREAM_BLOCKS:
        if kind == "mixed":
          cin, c1, c3r, c3, cdr, cd, proj, pool = widths
          self.conv_bn(f"{name}_1x1", cin, c1, 1)
          self.conv_bn(f"{name}_3x3_reduce", cin, c3r, 1)
          self.conv_bn(f"{name}_3x3", c3r, c3, 3, padding=1)
          self.conv_bn(f"{name}_double_3x3_reduce", cin, cdr, 1)
          self.conv_bn(f"{name}_double_3x3_1", cdr, cd, 3, padding=1)
          self.conv_bn(f"{name}_double_3x3_2", cd, cd, 3, padding=1)
          if pool == "avg":
            setattr(self, f"{name}_pool", nn.AvgPool2d(
                3, stride=1, padding=1, ceil_mode=True,
                count_include_pad=True))
          else:  # inception_5b
            setattr(self, f"{name}_pool", nn.MaxPool2d(
                (3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1),
                ceil_mode=True))
          self.conv_bn(f"{name}_pool_proj", cin, proj, 1)
        else:
          cin, c3r, c3, cdr, cd = widths
          self.conv_bn(f"{name}_3x3_reduce", cin, c3r, 1)
          self.conv_bn(f"{name}_3x3", c3r, c3, 3, stride=2, padding=1)
          self.conv_bn(f"{name}_double_3x3_reduce", cin, cdr, 1)
          self.conv_bn(f"{name}_double_3x3_1", cdr, cd, 3, padding=1)
          self.conv_bn(f"{name}_double_3x3_2", cd, cd, 3, stride=2, padding=1)
          setattr(self, f"{name}_pool", nn.MaxPool2d(
              (3, 3), stride=(2, 2), dilation=(1, 1), ceil_mode=True))
      self.global_pool = nn.AvgPool2d(7, stride=1, padding=0, ceil_mode=True,
                                      count_include_pad=True)
      self.last_linear = nn.Linear(1024, num_classes)

    def conv_bn(self, name, cin, cout, kernel, stride=1, padding=0):
      """Upstream's `name` (Conv2d, with its default bias) and `name_bn`."""
      setattr(self, name, nn.Conv2d(cin, cout, kernel_size=(kernel, kernel),
                                    stride=(stride, stride),
                                    padding=(padding, padding)))
      setattr(self, f"{name}_bn", nn.BatchNorm2d(cout, affine=True))

    def unit(self, name, x):
      """conv -> bn -> relu, as upstream's `name`, `name_bn`, relu."""
      return F.relu(getattr(self, f"{name}_bn")(getattr(self, name)(x)))

    def features(self, x):
      x = self.unit("conv1_7x7_s2", x)
      x = self.pool1_3x3_s2(x)
      x = self.unit("conv2_3x3_reduce", x)
      x = self.unit("conv2_3x3", x)
      x = self.pool2_3x3_s2(x)
      for name, kind, _ in UPSTREAM_BLOCKS:
        b3 = self.unit(f"{name}_3x3", self.unit(f"{name}_3x3_reduce", x))
        bd = self.unit(f"{name}_double_3x3_reduce", x)
        bd = self.unit(f"{name}_double_3x3_1", bd)
        bd = self.unit(f"{name}_double_3x3_2", bd)
        pool = getattr(self, f"{name}_pool")(x)
        if kind == "mixed":
          b1 = self.unit(f"{name}_1x1", x)
          x = torch.cat([b1, b3, bd, self.unit(f"{name}_pool_proj", pool)], 1)
        else:
          x = torch.cat([b3, bd, pool], 1)
      return x

    def logits(self, features):
      if features.shape[2:] == (7, 7):
        x = self.global_pool(features)
      else:  # see the module docstring
        x = F.adaptive_avg_pool2d(features, 1)
      x = x.view(x.size(0), -1)
      return self.last_linear(x)

    def forward(self, x):
      """(logits, inception_5b): upstream's forward, keeping the map."""
      features = self.features(x)
      return self.logits(features), features

  return BNInception


def build_torch_reference(num_classes: int = 1000, seed: int = 0):
  """BNInception (eval mode) with PyTorch's default initialisation (upstream
  sets none) and random BatchNorm statistics and affine parameters."""
  return common.random_torch_reference(
      functools.partial(torch_module(), num_classes=num_classes), seed)


def torch_inputs(x: np.ndarray) -> np.ndarray:
  """Our [-1, 1] RGB NHWC input as pretrainedmodels' transform makes it:
  BGR, 0..255, minus MEAN_BGR, NCHW."""
  pixels = (np.asarray(x, np.float64) + 1.0) * 127.5
  bgr = pixels[..., ::-1] - MEAN_BGR
  return np.ascontiguousarray(bgr.transpose(0, 3, 1, 2), np.float32)


def torch_outputs(net, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(logits, inception_5b NHWC) of the reference for our input `x`."""
  import torch
  with torch.no_grad():
    logits, fmap = net(torch.from_numpy(torch_inputs(x)))
  return logits.numpy(), fmap.numpy().transpose(0, 2, 3, 1)


# (logits, inception_5b) of our model: flax_outputs(variables, x, **kwargs).
flax_outputs = functools.partial(common.flax_outputs, "bn_inception")


def caffe_size(size: int) -> int:
  """`size`, or the nearest size below that the Caffe net computes, saying
  so in the log."""
  checked = bn_inception.computable_size(size, "caffe")
  if checked != size:
    log.warning("the Caffe BN-Inception cannot compute %d-px inputs; "
                "checking %d px instead", size, checked)
  return checked


def torch_parity(model: str = "bn_inception", sizes=(299, 224),
                 batch: int = 2, seed: int = 0) -> dict[str, float]:
  """Saves a random BNInception as a .pth, converts it through
  `cxr_jax.weights.bn_inception` and the converted-file round trip, and
  compares: {'pretrainedmodels@<size>/<logits|feature_map>': max abs error}.

  A size the Caffe net cannot compute (299) is checked at the nearest size
  below that it can (294), which the key names.
  """
  if model != "bn_inception":
    raise ValueError(f"no pretrainedmodels reference for {model!r}")
  return common.torch_parity(model, "pretrainedmodels", build_torch_reference,
                             torch_outputs, sizes, batch, seed,
                             input_size=caffe_size)


CHECKS: dict[str, Callable[..., dict[str, float]]] = {
    "bn_inception": functools.partial(torch_parity, "bn_inception")}

__all__ = ["CHECKS", "PRETRAINEDMODELS_VERSION", "UPSTREAM_PARAMETERS",
           "build_torch_reference", "caffe_size", "flax_outputs",
           "parameter_count", "torch_inputs", "torch_module", "torch_outputs",
           "torch_parity"]
