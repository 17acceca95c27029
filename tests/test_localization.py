"""CAM against a hand-computed case, box extraction and the two overlap
scores."""

import numpy as np
import pytest

from cxr_jax import localization as loc


def test_cam_weights_the_feature_map_by_the_class_head():
  # 4x4 map, 3 channels; class 1 looks at channel 2 only.
  feats = np.zeros((4, 4, 3))
  feats[1, 2, 2] = 5.0           # the class-1 evidence, at row 1, col 2
  feats[3, 0, 0] = 9.0           # strong, but in a channel class 1 ignores
  kernel = np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 2.0]])  # [K=3, C=2]
  cam1 = loc.class_activation_map(feats, kernel, 1)
  expected = np.zeros((4, 4))
  expected[1, 2] = 10.0
  np.testing.assert_array_equal(cam1, expected)
  cam0 = loc.class_activation_map(feats, kernel, 0)
  assert np.unravel_index(np.argmax(cam0), cam0.shape) == (3, 0)
  # Upsampled to 64 px, the class-1 peak lands in cell (1, 2)'s pixels and
  # its thresholded box sits around that cell.
  heat = loc.cam_to_uint8(cam1, 64, "resize")
  assert heat.max() == 255 and heat.min() == 0
  y, x = np.unravel_index(np.argmax(heat), heat.shape)
  assert 16 <= y < 32 and 32 <= x < 48
  box = loc.box_from_heatmap(heat, 200)
  bx, by, bw, bh = box
  assert 30 <= bx and bx + bw <= 50 and 14 <= by and by + bh <= 34


def test_largest_component_wins():
  heat = np.zeros((20, 20), np.uint8)
  heat[1:3, 1:3] = 255          # small region
  heat[10:16, 5:12] = 230       # the larger one
  assert loc.box_from_heatmap(heat, 200) == (5.0, 10.0, 7.0, 6.0)
  assert loc.box_from_heatmap(np.zeros((5, 5), np.uint8), 200) is None


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
  cam = np.zeros((8, 8))
  cam[2, 5] = 1.0
  heat = loc.cam_to_uint8(cam, 299)  # receptive_field is the default
  y, x = np.unravel_index(np.argmax(heat), heat.shape)
  # Cell i is centred at 37.5 + 32 i px at 299 (pixel k spans [k, k+1)).
  assert (y, x) == (101, 197)
  box = loc.box_from_heatmap(heat, 200)
  assert box[0] + box[2] / 2 == pytest.approx(197.5, abs=0.5)
  # Plain resizing stretches the grid: the same cell lands 8 px further out.
  y, x = np.unravel_index(np.argmax(loc.cam_to_uint8(cam, 299, "resize")),
                          (299, 299))
  assert abs(x - (5.5 * 299 / 8)) <= 1 and abs(y - 2.5 * 299 / 8) <= 1
  with pytest.raises(ValueError, match="8x8"):
    loc.cam_to_uint8(np.zeros((3, 3)), 299)
