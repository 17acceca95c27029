"""torchvision's ResNet-50/101/152, written out for the parity check.

torchvision cannot be installed beside the CPU torch wheel used here, so
this is the reference: `Bottleneck` and `ResNet` below are
torchvision/models/resnet.py of torchvision 0.29.1 line for line, cut to what
resnet50/101/152 use (no BasicBlock, groups, width_per_group, dilation or
zero_init_residual; torchvision's defaults for those are what these models
run). The module tree, and so the state dict's keys, shapes and order, are
torchvision's; its parameter count is checked against torchvision's published
`num_params`. It is written from torchvision's source, not from our Flax model.

torch is imported inside the functions, so `import cxr_jax.parity.resnet`
works without it; only running a torch check needs it.
"""

from __future__ import annotations

import functools
from typing import Callable

import numpy as np

from cxr_jax.parity import common
from cxr_jax.parity.common import parameter_count
from cxr_jax.weights.common import IMAGENET_MEAN, IMAGENET_STD

# torchvision 0.29.1's ResNet{50,101,152}_Weights meta "num_params".
PUBLISHED_PARAMETERS = {"resnet50": 25_557_032, "resnet101": 44_549_160,
                        "resnet152": 60_192_808}
# torchvision.models.resnet50/101/152: _resnet(Bottleneck, layers, ...).
LAYERS = {"resnet50": [3, 4, 6, 3], "resnet101": [3, 4, 23, 3],
          "resnet152": [3, 8, 36, 3]}


@functools.lru_cache(maxsize=1)
def torch_modules() -> tuple[type, type]:
  """(Bottleneck, ResNet): torchvision's classes, defined on first use."""
  import torch
  import torch.nn as nn

  def conv3x3(in_planes, out_planes, stride=1, groups=1, dilation=1):
    """3x3 convolution with padding"""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride,
                     padding=dilation, groups=groups, bias=False,
                     dilation=dilation)

  def conv1x1(in_planes, out_planes, stride=1):
    """1x1 convolution"""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride,
                     bias=False)

  class Bottleneck(nn.Module):
    # torchvision puts the stride on the 3x3 (conv2): ResNet V1.5.
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
      super().__init__()
      norm_layer = nn.BatchNorm2d
      width = planes
      self.conv1 = conv1x1(inplanes, width)
      self.bn1 = norm_layer(width)
      self.conv2 = conv3x3(width, width, stride)
      self.bn2 = norm_layer(width)
      self.conv3 = conv1x1(width, planes * self.expansion)
      self.bn3 = norm_layer(planes * self.expansion)
      self.relu = nn.ReLU(inplace=True)
      self.downsample = downsample
      self.stride = stride

    def forward(self, x):
      identity = x

      out = self.conv1(x)
      out = self.bn1(out)
      out = self.relu(out)

      out = self.conv2(out)
      out = self.bn2(out)
      out = self.relu(out)

      out = self.conv3(out)
      out = self.bn3(out)

      if self.downsample is not None:
        identity = self.downsample(x)

      out += identity
      out = self.relu(out)

      return out

  class ResNet(nn.Module):

    def __init__(self, block, layers, num_classes=1000):
      super().__init__()
      norm_layer = nn.BatchNorm2d
      self._norm_layer = norm_layer

      self.inplanes = 64
      self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2,
                             padding=3, bias=False)
      self.bn1 = norm_layer(self.inplanes)
      self.relu = nn.ReLU(inplace=True)
      self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
      self.layer1 = self._make_layer(block, 64, layers[0])
      self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
      self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
      self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
      self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
      self.fc = nn.Linear(512 * block.expansion, num_classes)

      for m in self.modules():
        if isinstance(m, nn.Conv2d):
          nn.init.kaiming_normal_(m.weight, mode="fan_out",
                                  nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
          nn.init.constant_(m.weight, 1)
          nn.init.constant_(m.bias, 0)

    def _make_layer(self, block, planes, blocks, stride=1):
      norm_layer = self._norm_layer
      downsample = None
      if stride != 1 or self.inplanes != planes * block.expansion:
        downsample = nn.Sequential(
            conv1x1(self.inplanes, planes * block.expansion, stride),
            norm_layer(planes * block.expansion),
        )

      layers = []
      layers.append(block(self.inplanes, planes, stride, downsample))
      self.inplanes = planes * block.expansion
      for _ in range(1, blocks):
        layers.append(block(self.inplanes, planes))

      return nn.Sequential(*layers)

    def forward_features(self, x):
      """_forward_impl's steps up to layer4, in its order: the map our head
      reads."""
      for step in (self.conv1, self.bn1, self.relu, self.maxpool,
                   self.layer1, self.layer2, self.layer3, self.layer4):
        x = step(x)
      return x

    def forward(self, x):
      """(logits, layer4): _forward_impl, keeping the map it pools."""
      features = self.forward_features(x)
      x = self.avgpool(features)
      x = torch.flatten(x, 1)
      return self.fc(x), features

  return Bottleneck, ResNet


def build_torch_reference(model: str, num_classes: int = 1000,
                          seed: int = 0):
  """torchvision's `model` (eval mode) with random weights and random
  BatchNorm statistics and affine parameters.

  The convolutions are redrawn Glorot-uniform (Keras' default) instead of
  torchvision's kaiming fan-out: BatchNorm with random, not measured,
  running statistics does not renormalise, and with kaiming's larger
  weights every block grows the residual stream, until float32 rounding of
  the logits alone approaches the 1e-4 bar. Glorot's smaller weights keep
  the logits small, so the check measures the conversion, not rounding.
  """
  if model not in LAYERS:
    raise ValueError(f"no torch reference for {model!r}; choose one of "
                     f"{sorted(LAYERS)}")
  return common.random_torch_reference(
      functools.partial(_glorot_resnet, model, num_classes), seed)


def _glorot_resnet(model: str, num_classes: int):
  """torchvision's `model`, its convolutions redrawn Glorot-uniform."""
  import torch
  bottleneck, resnet = torch_modules()
  net = resnet(bottleneck, LAYERS[model], num_classes=num_classes)
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, torch.nn.Conv2d):
        torch.nn.init.xavier_uniform_(m.weight)
  return net


def torch_outputs(net, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(logits, layer4 NHWC) for our input `x` in [-1, 1] (NHWC), normalised
  as torchvision's transforms do: (x / 2 + 1/2 - mean) / std."""
  import torch
  pixels = (np.asarray(x, np.float64) + 1.0) / 2.0
  normed = ((pixels - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)
  with torch.no_grad():
    logits, fmap = net(torch.from_numpy(normed.transpose(0, 3, 1, 2)))
  return logits.numpy(), fmap.numpy().transpose(0, 2, 3, 1)


def torch_parity(model: str, sizes=(299, 224), batch: int = 2,
                 seed: int = 0) -> dict[str, float]:
  """Saves a random torchvision `model` as a .pth, converts it through
  `cxr_jax.weights.resnet` and the converted-file round trip, and compares:
  {'torchvision@<size>/<logits|feature_map>': max abs error}."""
  return common.torch_parity(
      model, "torchvision", functools.partial(build_torch_reference, model),
      torch_outputs, sizes, batch, seed)


CHECKS: dict[str, Callable[..., dict[str, float]]] = {
    name: functools.partial(torch_parity, name) for name in LAYERS}

__all__ = ["CHECKS", "LAYERS", "PUBLISHED_PARAMETERS", "build_torch_reference",
           "parameter_count", "torch_modules", "torch_outputs",
           "torch_parity"]
