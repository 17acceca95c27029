"""Inception V4 reference in PyTorch, written line by line after
`pretrainedmodels/models/inceptionv4.py` (pretrainedmodels 0.7.4, Cadene)
and `timm/models/inception_v4.py` (timm 1.0.31), which share the layout and
therefore the state-dict keys (`features.N.<branch>.conv.weight`,
`features.N.<branch>.bn.{weight,bias,running_mean,running_var}`,
`last_linear.{weight,bias}`).

Each block's `__init__` follows upstream's line for line, with two
shorthands: an `nn.Sequential` of BasicConv2d is `convs(...)`, each conv
written as its arguments, and the average-pool branch of Inception_A/B/C is
`pool_branch`. Every block but Inception_C has upstream's forward, its
branches concatenated in the order `__init__` makes them (`Branches`).

Where they differ, `head` chooses:

* 'timm': global average pooling (`SelectAdaptivePool2d('avg')`), dropout
  (`drop_rate`, 0 by default) and `last_linear`; timm's ImageNet file has
  1000 classes. timm builds every conv with `ConvNormAct(padding=0)` and its
  BatchNorm with eps=1e-3, which is pretrainedmodels' BasicConv2d.
* 'pretrainedmodels': `nn.AvgPool2d(8, count_include_pad=False)` and
  `last_linear`. That pool is global only for an 8x8 map (299-px inputs);
  at 224 px the map is 5x5 and upstream raises, so `reference_logits` then
  pools globally (what the 8x8 pool does at 299, and what we do). Its
  ImageNet file has 1001 classes, background first.

The check builds the reference with random weights and random BatchNorm
statistics, saves its state dict, converts it through
`cxr_jax.weights.inception_v4` and compares logits and the final map.
"""

from __future__ import annotations

import functools

import numpy as np

from cxr_jax.parity import common
from cxr_jax.parity.common import parameter_count  # noqa: F401 (re-export)

HEADS = ("timm", "pretrainedmodels")
# pretrainedmodels' ImageNet checkpoint keeps TF-slim's background class.
NUM_CLASSES = {"timm": 1000, "pretrainedmodels": 1001}


def _modules():
  """The reference classes; defined here so that importing this module
  needs no torch."""
  import torch
  import torch.nn as nn

  class BasicConv2d(nn.Module):

    def __init__(self, in_planes, out_planes, kernel_size, stride, padding=0):
      super().__init__()
      self.conv = nn.Conv2d(in_planes, out_planes, kernel_size=kernel_size,
                            stride=stride, padding=padding, bias=False)
      self.bn = nn.BatchNorm2d(out_planes, eps=0.001, momentum=0.1,
                               affine=True)
      self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
      return self.relu(self.bn(self.conv(x)))

  def convs(*rows):
    """Upstream's nn.Sequential of BasicConv2d, each conv written as its
    arguments (in_planes, out_planes, kernel_size, stride[, padding])."""
    return nn.Sequential(*(BasicConv2d(*row) for row in rows))

  def pool_branch(in_planes, out_planes):
    """Upstream's branch3 of Inception_A/B/C: a 3x3 average that leaves the
    padding out, then a 1x1 conv."""
    return nn.Sequential(
        nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False),
        BasicConv2d(in_planes, out_planes, kernel_size=1, stride=1))

  class Branches(nn.Module):
    """Upstream's forward of every block but Inception_C: the branches'
    outputs concatenated on channels, in the order __init__ makes them."""

    def forward(self, x):
      return torch.cat([branch(x) for branch in self.children()], 1)

  class Mixed_3a(Branches):

    def __init__(self):
      super().__init__()
      self.maxpool = nn.MaxPool2d(3, stride=2)
      self.conv = BasicConv2d(64, 96, kernel_size=3, stride=2)

  class Mixed_4a(Branches):

    def __init__(self):
      super().__init__()
      self.branch0 = convs((160, 64, 1, 1), (64, 96, 3, 1))
      self.branch1 = convs((160, 64, 1, 1), (64, 64, (1, 7), 1, (0, 3)),
                           (64, 64, (7, 1), 1, (3, 0)), (64, 96, (3, 3), 1))

  class Mixed_5a(Branches):

    def __init__(self):
      super().__init__()
      self.conv = BasicConv2d(192, 192, kernel_size=3, stride=2)
      self.maxpool = nn.MaxPool2d(3, stride=2)

  class Inception_A(Branches):

    def __init__(self):
      super().__init__()
      self.branch0 = BasicConv2d(384, 96, kernel_size=1, stride=1)
      self.branch1 = convs((384, 64, 1, 1), (64, 96, 3, 1, 1))
      self.branch2 = convs((384, 64, 1, 1), (64, 96, 3, 1, 1),
                           (96, 96, 3, 1, 1))
      self.branch3 = pool_branch(384, 96)

  class Reduction_A(Branches):

    def __init__(self):
      super().__init__()
      self.branch0 = BasicConv2d(384, 384, kernel_size=3, stride=2)
      self.branch1 = convs((384, 192, 1, 1), (192, 224, 3, 1, 1),
                           (224, 256, 3, 2))
      self.branch2 = nn.MaxPool2d(3, stride=2)

  class Inception_B(Branches):

    def __init__(self):
      super().__init__()
      self.branch0 = BasicConv2d(1024, 384, kernel_size=1, stride=1)
      self.branch1 = convs((1024, 192, 1, 1), (192, 224, (1, 7), 1, (0, 3)),
                           (224, 256, (7, 1), 1, (3, 0)))
      self.branch2 = convs((1024, 192, 1, 1), (192, 192, (7, 1), 1, (3, 0)),
                           (192, 224, (1, 7), 1, (0, 3)),
                           (224, 224, (7, 1), 1, (3, 0)),
                           (224, 256, (1, 7), 1, (0, 3)))
      self.branch3 = pool_branch(1024, 128)

  class Reduction_B(Branches):

    def __init__(self):
      super().__init__()
      self.branch0 = convs((1024, 192, 1, 1), (192, 192, 3, 2))
      self.branch1 = convs((1024, 256, 1, 1), (256, 256, (1, 7), 1, (0, 3)),
                           (256, 320, (7, 1), 1, (3, 0)), (320, 320, 3, 2))
      self.branch2 = nn.MaxPool2d(3, stride=2)

  class Inception_C(nn.Module):

    def __init__(self):
      super().__init__()
      self.branch0 = BasicConv2d(1536, 256, kernel_size=1, stride=1)
      self.branch1_0 = BasicConv2d(1536, 384, kernel_size=1, stride=1)
      self.branch1_1a = BasicConv2d(384, 256, kernel_size=(1, 3), stride=1,
                                    padding=(0, 1))
      self.branch1_1b = BasicConv2d(384, 256, kernel_size=(3, 1), stride=1,
                                    padding=(1, 0))
      self.branch2_0 = BasicConv2d(1536, 384, kernel_size=1, stride=1)
      self.branch2_1 = BasicConv2d(384, 448, kernel_size=(3, 1), stride=1,
                                   padding=(1, 0))
      self.branch2_2 = BasicConv2d(448, 512, kernel_size=(1, 3), stride=1,
                                   padding=(0, 1))
      self.branch2_3a = BasicConv2d(512, 256, kernel_size=(1, 3), stride=1,
                                    padding=(0, 1))
      self.branch2_3b = BasicConv2d(512, 256, kernel_size=(3, 1), stride=1,
                                    padding=(1, 0))
      self.branch3 = pool_branch(1536, 256)

    def forward(self, x):
      x0 = self.branch0(x)
      x1_0 = self.branch1_0(x)
      x1 = torch.cat((self.branch1_1a(x1_0), self.branch1_1b(x1_0)), 1)
      x2_0 = self.branch2_0(x)
      x2_2 = self.branch2_2(self.branch2_1(x2_0))
      x2 = torch.cat((self.branch2_3a(x2_2), self.branch2_3b(x2_2)), 1)
      x3 = self.branch3(x)
      return torch.cat((x0, x1, x2, x3), 1)

  class InceptionV4(nn.Module):

    def __init__(self, num_classes=1001, head="pretrainedmodels",
                 drop_rate=0.0):
      super().__init__()
      if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
      self.head = head
      self.features = nn.Sequential(
          BasicConv2d(3, 32, kernel_size=3, stride=2),
          BasicConv2d(32, 32, kernel_size=3, stride=1),
          BasicConv2d(32, 64, kernel_size=3, stride=1, padding=1),
          Mixed_3a(),
          Mixed_4a(),
          Mixed_5a(),
          Inception_A(),
          Inception_A(),
          Inception_A(),
          Inception_A(),
          Reduction_A(),  # Mixed_6a
          Inception_B(),
          Inception_B(),
          Inception_B(),
          Inception_B(),
          Inception_B(),
          Inception_B(),
          Inception_B(),
          Reduction_B(),  # Mixed_7a
          Inception_C(),
          Inception_C(),
          Inception_C(),
      )
      if head == "pretrainedmodels":
        self.avg_pool = nn.AvgPool2d(8, count_include_pad=False)
      else:  # timm: create_classifier(pool_type='avg', drop_rate=...)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.head_drop = nn.Dropout(drop_rate)
      self.last_linear = nn.Linear(1536, num_classes)

    def logits(self, features):
      if self.head == "pretrainedmodels":
        x = self.avg_pool(features)
        x = x.view(x.size(0), -1)
      else:
        x = self.head_drop(torch.flatten(self.global_pool(features), 1))
      return self.last_linear(x)

    def forward(self, input):
      return self.logits(self.features(input))

  return InceptionV4


def build_reference(head: str = "timm", num_classes: int | None = None,
                    seed: int = 0):
  """The reference in eval mode with random weights and random BatchNorm
  statistics (`common.randomize_batch_norm`)."""
  num_classes = NUM_CLASSES[head] if num_classes is None else num_classes
  return common.random_torch_reference(
      functools.partial(_modules(), num_classes=num_classes, head=head), seed)


def reference_outputs(net, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(logits, final map NHWC) for our input `x` in [-1, 1] NHWC; both
  sources normalise with mean 0.5 and std 0.5, which maps [0, 1] pixels to
  exactly our [-1, 1]."""
  import torch
  with torch.no_grad():
    features = net.features(torch.from_numpy(
        np.ascontiguousarray(x.transpose(0, 3, 1, 2))))
    if net.head == "pretrainedmodels" and features.shape[-1] != 8:
      # Upstream's AvgPool2d(8) is global only on an 8x8 map (see above).
      logits = net.last_linear(features.mean((2, 3)))
    else:
      logits = net.logits(features)
  return logits.numpy(), features.numpy().transpose(0, 2, 3, 1)


def save_state_dict(net, path: str, prefix: str = "") -> str:
  import torch
  torch.save({prefix + k: v for k, v in net.state_dict().items()}, path)
  return path


def torch_parity(sizes=(299, 224), batch: int = 2, seed: int = 0,
                 heads=HEADS) -> dict[str, float]:
  """{'<source>@<size>/<logits|feature_map>': max abs error} for each
  source's reference, converted by that source's converter."""
  errors = {}
  for head in heads:
    errors.update(common.torch_parity(
        "inception_v4", head, functools.partial(build_reference, head),
        reference_outputs, sizes, batch, seed))
  return errors


CHECKS = {"inception_v4": torch_parity}
