"""CAM against a hand-computed case, box extraction and the two overlap
scores."""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

from cxr_jax import cam
from cxr_jax import localization as loc
from cxr_jax.models import common
from cxr_jax.models.inception_v3 import feature_grid


class _HeadOnly(nn.Module):
  """The shared head on a given feature map, to check class maps by hand."""

  @nn.compact
  def __call__(self, x):
    return common.classifier_head(x, num_classes=2, class_maps=True)


def test_class_maps_weight_the_feature_map_by_the_class_head():
  # 4x4 map, 3 channels; class 1 looks at channel 2 only.
  feats = np.zeros((1, 4, 4, 3), np.float32)
  feats[0, 1, 2, 2] = 5.0           # the class-1 evidence, at row 1, col 2
  feats[0, 3, 0, 0] = 9.0           # strong, but in a channel class 1 ignores
  kernel = np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 2.0]], np.float32)
  bias = np.array([0.5, -1.0], np.float32)
  variables = {"params": {"head": {"kernel": kernel, "bias": bias}}}
  logits, out = _HeadOnly().apply(variables, jnp.asarray(feats))
  maps = np.asarray(out["class_maps"][0])
  expected = np.full((4, 4), -1.0)
  expected[1, 2] = 9.0              # 2 * 5 - 1
  np.testing.assert_allclose(maps[..., 1], expected)
  assert np.unravel_index(np.argmax(maps[..., 0]), (4, 4)) == (3, 0)
  # The head is linear: average pooling of the class maps gives the logits.
  np.testing.assert_allclose(maps.mean((0, 1)), np.asarray(logits[0]),
                             atol=1e-6)
  # Upsampled to 64 px, the class-1 peak lands in cell (1, 2)'s pixels and
  # its thresholded box sits around that cell.
  heat = cam.to_uint8(maps[..., 1], 64, (4, 8.0, 16.0), "resize")
  assert heat.max() == 255 and heat.min() == 0
  y, x = np.unravel_index(np.argmax(heat), heat.shape)
  assert 16 <= y < 32 and 32 <= x < 48
  bx, by, bw, bh = cam.box_from_heatmap(heat, 200)
  assert 30 <= bx and bx + bw <= 50 and 14 <= by and by + bh <= 34


def test_largest_component_wins():
  heat = np.zeros((20, 20), np.uint8)
  heat[1:3, 1:3] = 255          # small region
  heat[10:16, 5:12] = 230       # the larger one
  assert cam.box_from_heatmap(heat, 200) == (5.0, 10.0, 7.0, 6.0)
  assert cam.box_from_heatmap(np.zeros((5, 5), np.uint8), 200) is None


def test_threshold_outside_the_heat_range_is_refused():
  for bad in (0, 256, 300):
    with pytest.raises(ValueError, match="--threshold"):
      cam.cam_box(np.zeros((8, 8)), 299, feature_grid(299), bad)


def test_iou_and_iobb():
  truth = (0.0, 0.0, 10.0, 10.0)
  inside = (2.0, 2.0, 4.0, 4.0)
  assert loc.iobb(inside, truth) == 1.0
  assert loc.iou(inside, truth) == pytest.approx(16 / 100)
  half = (5.0, 0.0, 10.0, 10.0)
  assert loc.iou(half, truth) == pytest.approx(50 / 150)
  assert loc.iobb(half, truth) == pytest.approx(0.5)
  assert loc.iou((20.0, 20.0, 1.0, 1.0), truth) == 0.0


def test_receptive_field_upsampling_puts_cells_at_their_centres():
  grid = feature_grid(299)
  class_map = np.zeros((8, 8))
  class_map[2, 5] = 1.0
  heat = cam.to_uint8(class_map, 299, grid)  # receptive_field by default
  y, x = np.unravel_index(np.argmax(heat), heat.shape)
  # Cell i is centred at 37.5 + 32 i px at 299 (pixel k spans [k, k+1)).
  assert (y, x) == (101, 197)
  box = cam.box_from_heatmap(heat, 200)
  assert box[0] + box[2] / 2 == pytest.approx(197.5, abs=0.5)
  # Plain resizing stretches the grid: the same cell lands 8 px further out.
  y, x = np.unravel_index(
      np.argmax(cam.to_uint8(class_map, 299, grid, "resize")), (299, 299))
  assert abs(x - (5.5 * 299 / 8)) <= 1 and abs(y - 2.5 * 299 / 8) <= 1
  with pytest.raises(ValueError, match="8x8"):
    cam.to_uint8(np.zeros((3, 3)), 299, grid)


def test_grid_geometry_of_same_and_symmetric_padding():
  # SAME with k=3, stride 2 on 224 pads (112-1)*2+3-224 = 1 pixel, all of
  # it after (TensorFlow's rule): cell i is centred at 2i + 1.5.
  assert common.grid_geometry(224, [(3, 2, "SAME")]) == (112, 1.5, 2.0)
  # On 225 it pads 2, 1 before: the centre moves back by one pixel.
  assert common.grid_geometry(225, [(3, 2, "SAME")]) == (113, 0.5, 2.0)
  # PyTorch's padding=3 on a 7x7 stride-2 conv (ResNet's stem) on 224.
  assert common.grid_geometry(224, [(7, 2, 3)]) == (112, 0.5, 2.0)


def test_chance_scores_each_box_against_other_films_of_its_class():
  row = lambda image, label, truth, pred: {
      "image": image, "label": label, "truth": truth, "pred": pred}
  rows = [
      row("a", "Mass", (0, 0, 10, 10), (0, 0, 10, 10)),
      # Same film as the first: never each other's control.
      row("a", "Mass", (50, 50, 10, 10), (0, 0, 10, 10)),
      # Inside a's second box: IoBB 1, IoU 16/100.
      row("b", "Mass", (0, 0, 10, 10), (52, 52, 4, 4)),
      row("c", "Mass", (100, 100, 10, 10), None),  # no box: scores nothing
      row("c", "Nodule", (0, 0, 10, 10), (0, 0, 10, 10)),  # no other film
  ]
  chance, kept = loc.chance_accuracy(rows)
  assert kept == 4
  # Per row (a, a, b, c), the share of the other films' boxes it hits:
  # 1/2 (b's), 1/2 (b's), 1/3 (a's second), 0.
  for t in loc.THRESHOLDS:
    assert chance[f"iobb@{t}"] == pytest.approx((0.5 + 0.5 + 1 / 3) / 4)
  assert chance["iou@0.1"] == pytest.approx((0.5 + 0.5 + 1 / 3) / 4)
  for t in (0.25, 0.5, 0.75):
    assert chance[f"iou@{t}"] == pytest.approx((0.5 + 0.5) / 4)
