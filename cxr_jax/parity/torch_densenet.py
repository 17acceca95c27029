"""torchvision's DenseNet as the reference for the DenseNet converter.

torchvision cannot be installed beside the CPU torch wheel used here, so
`reference(depth)` rebuilds its DenseNet from torchvision 0.29.1's
`torchvision/models/densenet.py` (`_DenseLayer`, `_DenseBlock`,
`_Transition`, `DenseNet`; without the memory-efficient checkpointing, which
changes no number): the same modules, attribute names, padding and forward,
so its state dict has torchvision's keys and shapes (parameter counts
7,978,856 / 14,149,480 / 20,013,928, torchvision's published ones).
`chexnet_checkpoint` re-keys such a state dict the way arnoweng/CheXNet's
`model.pth.tar` is keyed.

`CHECKS[model]` builds the reference with random weights and random
BatchNorm statistics, saves its state dict, converts it with
`cxr_jax.weights.densenet` and compares logits and the final map (norm5 +
ReLU). torch is imported inside the functions, so this module imports
without it.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable

import numpy as np

from cxr_jax.models import densenet as flax_densenet
from cxr_jax.parity import common

# torchvision.models.densenet<d>: (growth_rate, block_config,
# num_init_features); bn_size=4 and drop_rate=0 are the defaults.
CONFIGS = {121: (32, (6, 12, 24, 16), 64), 169: (32, (6, 12, 32, 32), 64),
           201: (32, (6, 12, 48, 32), 64)}
PUBLISHED_PARAMETERS = {121: 7_978_856, 169: 14_149_480, 201: 20_013_928}


@functools.lru_cache(maxsize=1)
def _modules():
  """torchvision's DenseNet classes (torch imported on first use)."""
  from collections import OrderedDict

  import torch
  import torch.nn as nn
  import torch.nn.functional as F

  class _DenseLayer(nn.Module):
    def __init__(self, num_input_features, growth_rate, bn_size):
      super().__init__()
      self.norm1 = nn.BatchNorm2d(num_input_features)
      self.relu1 = nn.ReLU(inplace=True)
      self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate,
                             kernel_size=1, stride=1, bias=False)
      self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
      self.relu2 = nn.ReLU(inplace=True)
      self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate,
                             kernel_size=3, stride=1, padding=1, bias=False)

    def forward(self, prev_features):
      concated_features = torch.cat(prev_features, 1)
      bottleneck_output = self.conv1(self.relu1(self.norm1(
          concated_features)))
      return self.conv2(self.relu2(self.norm2(bottleneck_output)))

  class _DenseBlock(nn.ModuleDict):
    def __init__(self, num_layers, num_input_features, bn_size, growth_rate):
      super().__init__()
      for i in range(num_layers):
        self.add_module(f"denselayer{i + 1}", _DenseLayer(
            num_input_features + i * growth_rate, growth_rate, bn_size))

    def forward(self, init_features):
      features = [init_features]
      for _, layer in self.items():
        features.append(layer(features))
      return torch.cat(features, 1)

  class _Transition(nn.Sequential):
    def __init__(self, num_input_features, num_output_features):
      super().__init__()
      self.norm = nn.BatchNorm2d(num_input_features)
      self.relu = nn.ReLU(inplace=True)
      self.conv = nn.Conv2d(num_input_features, num_output_features,
                            kernel_size=1, stride=1, bias=False)
      self.pool = nn.AvgPool2d(kernel_size=2, stride=2)

  class DenseNet(nn.Module):
    def __init__(self, growth_rate, block_config, num_init_features,
                 bn_size=4, num_classes=1000):
      super().__init__()
      self.features = nn.Sequential(OrderedDict([
          ("conv0", nn.Conv2d(3, num_init_features, kernel_size=7, stride=2,
                              padding=3, bias=False)),
          ("norm0", nn.BatchNorm2d(num_init_features)),
          ("relu0", nn.ReLU(inplace=True)),
          ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
      ]))
      num_features = num_init_features
      for i, num_layers in enumerate(block_config):
        self.features.add_module(f"denseblock{i + 1}", _DenseBlock(
            num_layers, num_features, bn_size, growth_rate))
        num_features = num_features + num_layers * growth_rate
        if i != len(block_config) - 1:
          self.features.add_module(f"transition{i + 1}", _Transition(
              num_features, num_features // 2))
          num_features = num_features // 2
      self.features.add_module("norm5", nn.BatchNorm2d(num_features))
      self.classifier = nn.Linear(num_features, num_classes)
      for m in self.modules():  # torchvision's "official init"
        if isinstance(m, nn.Conv2d):
          nn.init.kaiming_normal_(m.weight)
        elif isinstance(m, nn.BatchNorm2d):
          nn.init.constant_(m.weight, 1)
          nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.Linear):
          nn.init.constant_(m.bias, 0)

    def forward_features(self, x):
      """The map our head reads: `forward` up to its pooling."""
      return F.relu(self.features(x), inplace=True)

    def forward(self, x):
      out = F.adaptive_avg_pool2d(self.forward_features(x), (1, 1))
      return self.classifier(torch.flatten(out, 1))

  return DenseNet


def reference(depth: int = 121, num_classes: int = 1000):
  """torchvision's `densenet<depth>(num_classes=...)`, untrained."""
  growth_rate, block_config, num_init_features = CONFIGS[depth]
  return _modules()(growth_rate, block_config, num_init_features,
                    num_classes=num_classes)


def randomize(net, seed: int) -> None:
  """Random BatchNorm gamma, beta and running statistics, and a random
  classifier bias (torchvision initialises it to zero, which would hide a
  dropped bias)."""
  import torch
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        n = m.num_features
        m.weight.copy_(torch.rand(n, generator=g) + 0.5)
        m.bias.copy_(torch.randn(n, generator=g) * 0.2)
        m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
        m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
    net.classifier.bias.copy_(torch.randn(net.classifier.out_features,
                                          generator=g) * 0.2)


def chexnet_checkpoint(state_dict: dict[str, Any], depth: int = 121
                       ) -> dict[str, Any]:
  """`state_dict` keyed as arnoweng/CheXNet's `model.pth.tar` is:
  DataParallel's `module.`, the wrapper's `densenet121.` attribute, the
  old torchvision layer names (`norm.1`, `conv.1`, `norm.2`, `conv.2`),
  and the head inside `Sequential(Linear, Sigmoid)` (`classifier.0.`).
  Returned as `{'state_dict': ...}`, the checkpoint's layout."""
  out = {}
  for key, value in state_dict.items():
    key = re.sub(r"(denselayer\d+\.(?:norm|conv))([12])\.", r"\1.\2.", key)
    key = re.sub(r"^classifier\.", "classifier.0.", key)
    out[f"module.densenet{depth}.{key}"] = value
  return {"state_dict": out}


def to_torch_input(x: np.ndarray):
  """Our [-1, 1] NHWC input as torchvision's ImageNet-normalised NCHW."""
  import torch
  mean = np.array([0.485, 0.456, 0.406], np.float32)
  std = np.array([0.229, 0.224, 0.225], np.float32)
  pixels = ((np.asarray(x, np.float32) + 1.0) / 2.0 - mean) / std
  return torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))


def random_reference(depth: int = 121, num_classes: int = 1000,
                     seed: int = 0):
  """`reference(depth)` in eval mode, its initialisation drawn from `seed`,
  with random BatchNorm statistics and classifier bias (`randomize`)."""
  return common.random_torch_reference(
      functools.partial(reference, depth, num_classes), seed, randomize)


def torch_outputs(net, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(logits, `forward_features` NHWC) of a torchvision-style `net` for our
  input `x` in [-1, 1] (NHWC)."""
  import torch
  with torch.no_grad():
    t_in = to_torch_input(x)
    return (net(t_in).numpy(),
            net.forward_features(t_in).numpy().transpose(0, 2, 3, 1))


def torchvision_parity(build_reference: Callable[..., Any], model: str,
                       sizes=(299, 224), batch: int = 2, seed: int = 0,
                       num_classes: int = 1000) -> dict[str, float]:
  """{'torchvision@<size>/<logits|feature_map>': max abs error} of our
  `model` converted from `build_reference(depth, num_classes, seed=...)`:
  a random torchvision-style reference (`torch_outputs`) of the depth that
  ends `model`'s name."""
  depth = int(re.search(r"\d+$", model).group())
  return common.torch_parity(
      model, "torchvision",
      functools.partial(build_reference, depth, num_classes), torch_outputs,
      sizes, batch, seed)


# torch_parity(model, sizes, batch, seed, num_classes), DenseNet's check.
torch_parity = functools.partial(torchvision_parity, random_reference)

CHECKS = {name: functools.partial(torch_parity, name)
          for name in flax_densenet.MODELS}
