"""Class activation maps: from a model's class maps to a heat map, a box and
an overlay (Zhou et al. 2016; the paper's Section IV-G).

The model hands out its per-cell class scores (`out['class_maps']`, the head
applied to every cell of its last map), so CAM never reads parameters and
works for every backbone. A class's map is upsampled to the image with the
model's grid geometry (`model.feature_grid`), min-max scaled to 0..255,
thresholded, and the bounding box of the largest connected component is the
prediction. The head's bias shifts a map by a constant, which the min-max
scaling removes, so this equals Zhou et al.'s sum_k w_kc F_k.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import scipy.ndimage

UPSAMPLING = ("receptive_field", "resize")
Grid = tuple[int, float, float]  # (cells, offset, stride): model.feature_grid


def upsample(cam: np.ndarray, size: int, grid: Grid,
             method: str = "receptive_field") -> np.ndarray:
  """[h, w] map -> [size, size], bilinear.

  'receptive_field' places each cell's value at the centre of its receptive
  field (`grid`) and interpolates between centres, holding the edge values
  beyond the outer ones. 'resize' stretches the grid over the image
  (`jax.image.resize`), as most CAM code does; with InceptionV3's VALID stem
  that shifts the map outwards by up to 19 px at 299 px.
  """
  if method == "resize":
    return np.asarray(jax.image.resize(jnp.asarray(cam, jnp.float32),
                                       (size, size), "bilinear"))
  if method != "receptive_field":
    raise ValueError(f"upsampling must be one of {UPSAMPLING}, got {method!r}")
  cells, offset, stride = grid
  if cam.shape != (cells, cells):
    raise ValueError(f"a {size}-px input gives a {cells}x{cells} map; got "
                     f"{cam.shape}")
  u = (np.arange(size) + 0.5 - offset) / stride  # pixel centres, in cells
  rows, cols = np.meshgrid(u, u, indexing="ij")
  return scipy.ndimage.map_coordinates(np.asarray(cam, np.float64),
                                       [rows, cols], order=1, mode="nearest")


def to_uint8(cam: np.ndarray, size: int, grid: Grid,
             method: str = "receptive_field") -> np.ndarray:
  """Upsampling to size x size, then min-max scaling to 0..255."""
  up = upsample(cam, size, grid, method)
  lo, hi = float(up.min()), float(up.max())
  if hi - lo < 1e-12:
    return np.zeros((size, size), np.uint8)
  return np.round((up - lo) / (hi - lo) * 255).astype(np.uint8)


def check_threshold(threshold: int) -> int:
  """A heat threshold in 1..255: a map scaled to 0..255 never reaches more,
  so a larger threshold would silently box nothing."""
  if not 1 <= threshold <= 255:
    raise ValueError(f"the CAM threshold (--threshold) must be in 1..255 "
                     f"(heat maps are scaled to 0..255), got {threshold}")
  return threshold


def box_from_heatmap(heat: np.ndarray, threshold: int = 200
                     ) -> tuple[float, float, float, float] | None:
  """(x, y, w, h) of the largest connected region with heat >= threshold."""
  components, count = scipy.ndimage.label(heat >= threshold)
  if count == 0:
    return None
  sizes = np.bincount(components.ravel())[1:]
  ys, xs = np.nonzero(components == 1 + int(np.argmax(sizes)))
  return (float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
          float(ys.max() - ys.min() + 1))


def cam_box(class_map: np.ndarray, size: int, grid: Grid,
            threshold: int = 200, upsampling: str = "receptive_field"):
  """The paper's rule end to end on one class's [h, w] map:
  (heat map uint8 [size, size], box or None)."""
  heat = to_uint8(class_map, size, grid, upsampling)
  return heat, box_from_heatmap(heat, check_threshold(threshold))


def overlay(image: np.ndarray, heat: np.ndarray, truth, pred, path: str,
            title: str = "") -> None:
  """The film, the heat map, the ground truth (green), the prediction (blue)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.patches import Rectangle
  fig, axes = plt.subplots(1, 2, figsize=(6, 3.2))
  axes[0].imshow(image, cmap="gray")
  axes[1].imshow(image, cmap="gray")
  axes[1].imshow(heat, cmap="jet", alpha=0.4)
  for ax in axes:
    if truth is not None:  # `predict` has no ground truth
      ax.add_patch(Rectangle(truth[:2], truth[2], truth[3], fill=False,
                             edgecolor="lime", lw=1.5))
    ax.axis("off")
  if pred is not None:
    axes[1].add_patch(Rectangle(pred[:2], pred[2], pred[3], fill=False,
                                edgecolor="blue", lw=1.5))
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
