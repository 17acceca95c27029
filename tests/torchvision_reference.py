"""torchvision's Inception3, re-expressed with torch functional ops.

torchvision cannot be installed beside the CPU torch wheel used here, so this
file is the reference: it writes a state dict with torchvision's exact key
names and shapes (its parameter count is checked against torchvision's
published 27,161,264) and runs torchvision's forward pass on it with the real
torch ops (padding-counting average pools, transform_input, eps=1e-3
BatchNorm with gamma). It is written from torchvision/models/inception.py, not
from our Flax model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# (name, in, out, kernel, stride, padding) in torchvision's constructor order.
def _a(i, pf):
  return [("branch1x1", i, 64, (1, 1), 1, (0, 0)),
          ("branch5x5_1", i, 48, (1, 1), 1, (0, 0)),
          ("branch5x5_2", 48, 64, (5, 5), 1, (2, 2)),
          ("branch3x3dbl_1", i, 64, (1, 1), 1, (0, 0)),
          ("branch3x3dbl_2", 64, 96, (3, 3), 1, (1, 1)),
          ("branch3x3dbl_3", 96, 96, (3, 3), 1, (1, 1)),
          ("branch_pool", i, pf, (1, 1), 1, (0, 0))]


def _b(i):
  return [("branch3x3", i, 384, (3, 3), 2, (0, 0)),
          ("branch3x3dbl_1", i, 64, (1, 1), 1, (0, 0)),
          ("branch3x3dbl_2", 64, 96, (3, 3), 1, (1, 1)),
          ("branch3x3dbl_3", 96, 96, (3, 3), 2, (0, 0))]


def _c(i, c7):
  return [("branch1x1", i, 192, (1, 1), 1, (0, 0)),
          ("branch7x7_1", i, c7, (1, 1), 1, (0, 0)),
          ("branch7x7_2", c7, c7, (1, 7), 1, (0, 3)),
          ("branch7x7_3", c7, 192, (7, 1), 1, (3, 0)),
          ("branch7x7dbl_1", i, c7, (1, 1), 1, (0, 0)),
          ("branch7x7dbl_2", c7, c7, (7, 1), 1, (3, 0)),
          ("branch7x7dbl_3", c7, c7, (1, 7), 1, (0, 3)),
          ("branch7x7dbl_4", c7, c7, (7, 1), 1, (3, 0)),
          ("branch7x7dbl_5", c7, 192, (1, 7), 1, (0, 3)),
          ("branch_pool", i, 192, (1, 1), 1, (0, 0))]


def _d(i):
  return [("branch3x3_1", i, 192, (1, 1), 1, (0, 0)),
          ("branch3x3_2", 192, 320, (3, 3), 2, (0, 0)),
          ("branch7x7x3_1", i, 192, (1, 1), 1, (0, 0)),
          ("branch7x7x3_2", 192, 192, (1, 7), 1, (0, 3)),
          ("branch7x7x3_3", 192, 192, (7, 1), 1, (3, 0)),
          ("branch7x7x3_4", 192, 192, (3, 3), 2, (0, 0))]


def _e(i):
  return [("branch1x1", i, 320, (1, 1), 1, (0, 0)),
          ("branch3x3_1", i, 384, (1, 1), 1, (0, 0)),
          ("branch3x3_2a", 384, 384, (1, 3), 1, (0, 1)),
          ("branch3x3_2b", 384, 384, (3, 1), 1, (1, 0)),
          ("branch3x3dbl_1", i, 448, (1, 1), 1, (0, 0)),
          ("branch3x3dbl_2", 448, 384, (3, 3), 1, (1, 1)),
          ("branch3x3dbl_3a", 384, 384, (1, 3), 1, (0, 1)),
          ("branch3x3dbl_3b", 384, 384, (3, 1), 1, (1, 0)),
          ("branch_pool", i, 192, (1, 1), 1, (0, 0))]


STEM = [("Conv2d_1a_3x3", 3, 32, (3, 3), 2, (0, 0)),
        ("Conv2d_2a_3x3", 32, 32, (3, 3), 1, (0, 0)),
        ("Conv2d_2b_3x3", 32, 64, (3, 3), 1, (1, 1)),
        ("Conv2d_3b_1x1", 64, 80, (1, 1), 1, (0, 0)),
        ("Conv2d_4a_3x3", 80, 192, (3, 3), 1, (0, 0))]
BLOCKS = [("Mixed_5b", "A", _a(192, 32)), ("Mixed_5c", "A", _a(256, 64)),
          ("Mixed_5d", "A", _a(288, 64)), ("Mixed_6a", "B", _b(288)),
          ("Mixed_6b", "C", _c(768, 128)), ("Mixed_6c", "C", _c(768, 160)),
          ("Mixed_6d", "C", _c(768, 160)), ("Mixed_6e", "C", _c(768, 192)),
          ("Mixed_7a", "D", _d(768)), ("Mixed_7b", "E", _e(1280)),
          ("Mixed_7c", "E", _e(2048))]
AUX = [("conv0", 768, 128, (1, 1), 1, (0, 0)),
       ("conv1", 128, 768, (5, 5), 1, (0, 0))]
TORCHVISION_NUM_PARAMS = 27_161_264  # torchvision's Inception_V3_Weights meta


def all_convs(aux: bool = True):
  convs = list(STEM)
  for block, _, specs in BLOCKS:
    convs += [(f"{block}.{s[0]}",) + s[1:] for s in specs]
  if aux:
    convs += [(f"AuxLogits.{s[0]}",) + s[1:] for s in AUX]
  return convs


def random_state_dict(num_classes: int = 1000, aux: bool = True,
                      seed: int = 0) -> dict[str, torch.Tensor]:
  """A state dict with torchvision's keys, shapes and non-trivial BN stats."""
  g = torch.Generator().manual_seed(seed)
  sd = {}
  for name, cin, cout, k, _, _ in all_convs(aux):
    fan_in = cin * k[0] * k[1]
    sd[f"{name}.conv.weight"] = torch.randn(cout, cin, *k, generator=g) * (
        2.0 / fan_in) ** 0.5
    sd[f"{name}.bn.weight"] = 0.5 + torch.rand(cout, generator=g)
    sd[f"{name}.bn.bias"] = 0.2 * torch.randn(cout, generator=g)
    sd[f"{name}.bn.running_mean"] = 0.2 * torch.randn(cout, generator=g)
    sd[f"{name}.bn.running_var"] = 0.5 + 1.5 * torch.rand(cout, generator=g)
    sd[f"{name}.bn.num_batches_tracked"] = torch.tensor(1000)
  if aux:
    sd["AuxLogits.fc.weight"] = 0.01 * torch.randn(num_classes, 768,
                                                   generator=g)
    sd["AuxLogits.fc.bias"] = 0.01 * torch.randn(num_classes, generator=g)
  sd["fc.weight"] = 0.02 * torch.randn(num_classes, 2048, generator=g)
  sd["fc.bias"] = 0.02 * torch.randn(num_classes, generator=g)
  return sd


def num_trainable(sd) -> int:
  return sum(v.numel() for k, v in sd.items()
             if not k.endswith(("running_mean", "running_var",
                                "num_batches_tracked")))


def _conv(sd, name, x, stride, padding):
  x = F.conv2d(x, sd[f"{name}.conv.weight"], stride=stride, padding=padding)
  x = F.batch_norm(x, sd[f"{name}.bn.running_mean"],
                   sd[f"{name}.bn.running_var"], sd[f"{name}.bn.weight"],
                   sd[f"{name}.bn.bias"], training=False, eps=0.001)
  return F.relu(x)


def _block(sd, block, kind, specs, x):
  spec = {s[0]: s for s in specs}
  c = lambda n, y: _conv(sd, f"{block}.{n}", y, spec[n][4], spec[n][5])
  pool = lambda y: F.avg_pool2d(y, 3, stride=1, padding=1)  # counts padding
  if kind == "A":
    return torch.cat([
        c("branch1x1", x), c("branch5x5_2", c("branch5x5_1", x)),
        c("branch3x3dbl_3", c("branch3x3dbl_2", c("branch3x3dbl_1", x))),
        c("branch_pool", pool(x))], 1)
  if kind == "B":
    return torch.cat([
        c("branch3x3", x),
        c("branch3x3dbl_3", c("branch3x3dbl_2", c("branch3x3dbl_1", x))),
        F.max_pool2d(x, 3, stride=2)], 1)
  if kind == "C":
    b7 = c("branch7x7_3", c("branch7x7_2", c("branch7x7_1", x)))
    bd = x
    for i in range(1, 6):
      bd = c(f"branch7x7dbl_{i}", bd)
    return torch.cat([c("branch1x1", x), b7, bd, c("branch_pool", pool(x))], 1)
  if kind == "D":
    b3 = c("branch3x3_2", c("branch3x3_1", x))
    b7 = x
    for i in range(1, 5):
      b7 = c(f"branch7x7x3_{i}", b7)
    return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)
  b3 = c("branch3x3_1", x)
  b3 = torch.cat([c("branch3x3_2a", b3), c("branch3x3_2b", b3)], 1)
  bd = c("branch3x3dbl_2", c("branch3x3dbl_1", x))
  bd = torch.cat([c("branch3x3dbl_3a", bd), c("branch3x3dbl_3b", bd)], 1)
  return torch.cat([c("branch1x1", x), b3, bd, c("branch_pool", pool(x))], 1)


def _trunk(sd, x, transform_input: bool, blocks):
  if transform_input:
    x = torch.cat([
        x[:, 0:1] * (0.229 / 0.5) + (0.485 - 0.5) / 0.5,
        x[:, 1:2] * (0.224 / 0.5) + (0.456 - 0.5) / 0.5,
        x[:, 2:3] * (0.225 / 0.5) + (0.406 - 0.5) / 0.5], 1)
  for name, _, _, _, stride, padding in STEM:
    x = _conv(sd, name, x, stride, padding)
    if name in ("Conv2d_2b_3x3", "Conv2d_4a_3x3"):
      x = F.max_pool2d(x, 3, stride=2)
  for block, kind, specs in blocks:
    x = _block(sd, block, kind, specs, x)
  return x


@torch.no_grad()
def forward(sd, x: torch.Tensor, transform_input: bool):
  """torchvision's eval-mode forward: (logits, Mixed_7c map), NCHW input."""
  fmap = _trunk(sd, x, transform_input, BLOCKS)
  pooled = F.adaptive_avg_pool2d(fmap, (1, 1)).flatten(1)
  return F.linear(pooled, sd["fc.weight"], sd["fc.bias"]), fmap


@torch.no_grad()
def aux_forward(sd, x: torch.Tensor, transform_input: bool):
  """torchvision's AuxLogits head (training-only there), with eval-mode
  BatchNorm, to compare the inference arithmetic of our aux branch."""
  x = _trunk(sd, x, transform_input, BLOCKS[:8])  # up to Mixed_6e
  x = F.avg_pool2d(x, 5, stride=3)
  x = _conv(sd, "AuxLogits.conv0", x, 1, 0)
  x = _conv(sd, "AuxLogits.conv1", x, 1, 0)
  x = F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)
  return F.linear(x, sd["AuxLogits.fc.weight"], sd["AuxLogits.fc.bias"])


def imagenet_normalize(x01: torch.Tensor) -> torch.Tensor:
  mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
  std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
  return (x01 - mean) / std
