"""torchvision's VGG16/19 as the reference for the VGG converter.

torchvision cannot be installed beside the CPU torch wheel used here, so
`reference(depth)` rebuilds `features` with torchvision 0.29.1's
`torchvision/models/vgg.py` (`make_layers(cfgs['D' | 'E'])`, its `VGG`
initialisation), giving torchvision's keys (`features.0.weight`, ...).

The top is ours, not torchvision's: `avgpool` is an `AdaptiveAvgPool2d(1)`
instead of `(7, 7)` and `classifier` one `Linear(512, num_classes)` instead
of fc6/fc7/fc8, which is the head our VGG has (fc6/fc7 need 224-px inputs and
leave no map). `full_reference` keeps torchvision's own top, whose state dict
(published parameter counts 138,357,544 and 143,667,240) the converter must
read while skipping fc6/fc7/fc8.

`CHECKS[model]` builds the reference with random weights and random biases,
saves its state dict, converts it with `cxr_jax.weights.vgg` and compares
logits and the block5_pool map. torch is imported inside the functions.
"""

from __future__ import annotations

import functools

from cxr_jax.models import vgg as flax_vgg
from cxr_jax.parity import common
from cxr_jax.parity.torch_densenet import torchvision_parity

# torchvision's cfgs["D"] (vgg16) and cfgs["E"] (vgg19).
CFGS = {
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
         512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512,
         512, "M", 512, 512, 512, 512, "M"],
}
PUBLISHED_PARAMETERS = {16: 138_357_544, 19: 143_667_240}


def make_layers(cfg):
  """torchvision's `make_layers(cfg, batch_norm=False)`."""
  import torch.nn as nn
  layers, in_channels = [], 3
  for v in cfg:
    if v == "M":
      layers += [nn.MaxPool2d(kernel_size=2, stride=2)]
    else:
      layers += [nn.Conv2d(in_channels, v, kernel_size=3, padding=1),
                 nn.ReLU(inplace=True)]
      in_channels = v
  return nn.Sequential(*layers)


def _init(net) -> None:
  """torchvision VGG's `init_weights=True` initialisation."""
  import torch.nn as nn
  for m in net.modules():
    if isinstance(m, nn.Conv2d):
      nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
      nn.init.constant_(m.bias, 0)
    elif isinstance(m, nn.Linear):
      nn.init.normal_(m.weight, 0, 0.01)
      nn.init.constant_(m.bias, 0)


@functools.lru_cache(maxsize=1)
def _module():
  import torch
  import torch.nn as nn

  class VGG(nn.Module):
    """torchvision's VGG forward; `avgpool` and `classifier` as given."""

    def __init__(self, features, avgpool, classifier):
      super().__init__()
      self.features, self.avgpool = features, avgpool
      self.classifier = classifier
      _init(self)

    def forward(self, x):
      x = self.avgpool(self.features(x))
      return self.classifier(torch.flatten(x, 1))

    def forward_features(self, x):
      """The map our head reads: `features` (block5_pool), as DenseNet's
      reference names it, so both share `torch_densenet.torch_outputs`."""
      return self.features(x)

  return VGG


def reference(depth: int = 16, num_classes: int = 1000):
  """torchvision's VGG features, a global average pool and one linear."""
  import torch.nn as nn
  return _module()(make_layers(CFGS[depth]), nn.AdaptiveAvgPool2d((1, 1)),
                   nn.Linear(512, num_classes))


def full_reference(depth: int = 16, num_classes: int = 1000,
                   dropout: float = 0.5, hidden: int = 4096):
  """torchvision's `vgg<depth>()` as published, fc6/fc7/fc8 included
  (`hidden` narrows fc6/fc7 for tests that need their keys, not 0.5 GB)."""
  import torch.nn as nn
  classifier = nn.Sequential(
      nn.Linear(512 * 7 * 7, hidden), nn.ReLU(True), nn.Dropout(p=dropout),
      nn.Linear(hidden, hidden), nn.ReLU(True), nn.Dropout(p=dropout),
      nn.Linear(hidden, num_classes))
  return _module()(make_layers(CFGS[depth]), nn.AdaptiveAvgPool2d((7, 7)),
                   classifier)


def randomize_biases(net, seed: int) -> None:
  """Random biases (torchvision initialises them to zero, which would hide a
  dropped or misplaced bias)."""
  import torch
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
        m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)


def random_reference(depth: int = 16, num_classes: int = 1000,
                     seed: int = 0):
  """`reference(depth)` in eval mode, its initialisation drawn from `seed`,
  with random biases (`randomize_biases`)."""
  return common.random_torch_reference(
      functools.partial(reference, depth, num_classes), seed, randomize_biases)


# torch_parity(model, sizes, batch, seed, num_classes): VGG's check against
# features + global average pool + our own linear (see the docstring above).
torch_parity = functools.partial(torchvision_parity, random_reference)

CHECKS = {name: functools.partial(torch_parity, name)
          for name in flax_vgg.MODELS}
