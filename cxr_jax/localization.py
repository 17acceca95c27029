"""Class activation maps and box scoring (Zhou et al. 2016; the paper's
Section IV-G; Wang et al. 2017's Table 3 protocol).

For an image and a class c, the CAM is the last convolutional map (Mixed_7c,
or the transition layer's map when the model has one) weighted by the head's
weights of class c: cam = sum_k w_kc * F_k. It is upsampled to the image,
scaled to integers in [0, 255], thresholded at 200; the bounding box of the
largest connected component (scipy.ndimage.label) is the prediction. It is
scored against the ground truth by IoU and by IoBB (intersection over the
predicted box), and counted correct at T in {0.1, 0.25, 0.5, 0.75}.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.ndimage

from cxr_jax import labels as L
from cxr_jax.data import pipeline

THRESHOLDS = (0.1, 0.25, 0.5, 0.75)


def class_activation_map(features: np.ndarray, head_kernel: np.ndarray,
                         cls: int) -> np.ndarray:
  """[h, w, K] features, [K, C] head kernel -> [h, w] CAM of class `cls`."""
  return np.tensordot(np.asarray(features, np.float64),
                      np.asarray(head_kernel, np.float64)[:, cls], axes=1)


UPSAMPLING = ("receptive_field", "resize")


def upsample(cam: np.ndarray, size: int, method: str = "receptive_field",
             output_stride: int = 32) -> np.ndarray:
  """[h, w] map -> [size, size], bilinear.

  'receptive_field' places each cell's value at the centre of its receptive
  field (`inception_v3.feature_grid`) and interpolates between centres,
  holding the edge values beyond the outer ones. 'resize' stretches the grid
  over the image (`jax.image.resize`), as most CAM code does; with
  InceptionV3's VALID stem that shifts the map outwards by up to 19 px at
  299 px.
  """
  if method == "resize":
    return np.asarray(jax.image.resize(jnp.asarray(cam, jnp.float32),
                                       (size, size), "bilinear"))
  if method != "receptive_field":
    raise ValueError(f"upsampling must be one of {UPSAMPLING}, got {method!r}")
  from cxr_jax.models.inception_v3 import feature_grid
  cells, offset, stride = feature_grid(size, output_stride)
  if cam.shape != (cells, cells):
    raise ValueError(f"a {size}-px input gives a {cells}x{cells} map; got "
                     f"{cam.shape}")
  u = (np.arange(size) + 0.5 - offset) / stride  # pixel centres, in cells
  rows, cols = np.meshgrid(u, u, indexing="ij")
  return scipy.ndimage.map_coordinates(np.asarray(cam, np.float64),
                                       [rows, cols], order=1, mode="nearest")


def cam_to_uint8(cam: np.ndarray, size: int,
                 method: str = "receptive_field",
                 output_stride: int = 32) -> np.ndarray:
  """Upsampling to size x size, then min-max scaling to 0..255."""
  up = upsample(cam, size, method, output_stride)
  lo, hi = float(up.min()), float(up.max())
  if hi - lo < 1e-12:
    return np.zeros((size, size), np.uint8)
  return np.round((up - lo) / (hi - lo) * 255).astype(np.uint8)


def mass_radius(mass: np.ndarray, centre: float, fraction: float = 0.5
                ) -> float:
  """Radius (px) around the pixel point (centre, centre) that holds
  `fraction` of a non-negative [size, size] map's mass. On a cell's
  input-gradient magnitude it measures the cell's effective receptive field
  (Luo et al. 2016), which sizes its CAM blobs."""
  size = mass.shape[0]
  yy, xx = np.mgrid[0:size, 0:size] + 0.5
  radius = np.hypot(xx - centre, yy - centre).ravel()
  order = np.argsort(radius)
  cumulative = np.cumsum(mass.ravel()[order]) / mass.sum()
  return float(radius[order][np.searchsorted(cumulative, fraction)])


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


def _intersection(a, b) -> float:
  ax, ay, aw, ah = a
  bx, by, bw, bh = b
  w = min(ax + aw, bx + bw) - max(ax, bx)
  h = min(ay + ah, by + bh) - max(ay, by)
  return max(w, 0.0) * max(h, 0.0)


def iou(pred, truth) -> float:
  inter = _intersection(pred, truth)
  union = pred[2] * pred[3] + truth[2] * truth[3] - inter
  return inter / union if union > 0 else 0.0


def iobb(pred, truth) -> float:
  """Intersection over the predicted box (Wang et al. 2017)."""
  area = pred[2] * pred[3]
  return _intersection(pred, truth) / area if area > 0 else 0.0


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


def cam_box(features: np.ndarray, head_kernel: np.ndarray, cls: int,
            size: int, threshold: int = 200,
            upsampling: str = "receptive_field", output_stride: int = 32):
  """The paper's rule end to end: (heat map uint8 [size, size], box or None)."""
  heat = cam_to_uint8(class_activation_map(features, head_kernel, cls), size,
                      upsampling, output_stride)
  return heat, box_from_heatmap(heat, threshold)


def _box_image_indices(dataset: pipeline.PreparedDataset, data_dir: str
                       ) -> list[int]:
  """Records of the images the box list names, in dataset order: read from
  the metadata copy that `prepare` keeps, so no film without boxes is
  decoded."""
  from cxr_jax.data import metadata
  meta = metadata.read_all(data_dir)
  if meta.boxes is None:
    raise ValueError(f"the prepared dataset {data_dir} has no box list")
  boxed = set(meta.boxes.names)
  return [i for i, n in enumerate(dataset.names) if n in boxed]


def localize(workdir: str, data_dir: str | None = None, which: str = "best",
             threshold: int = 200, max_overlays: int = 24,
             out_dir: str | None = None,
             upsampling: str = "receptive_field") -> dict[str, Any]:
  """The `localize` command: every prepared image with boxes; returns the
  summary written to localization.json."""
  from tqdm import tqdm
  from cxr_jax import predict
  predictor = predict.Predictor(workdir, which)
  data_dir = data_dir or predictor.config.data_dir
  dataset = pipeline.PreparedDataset(data_dir, predictor.size)
  kernel = np.asarray(predictor.variables["params"]["head"]["kernel"])
  out_dir = out_dir or os.path.join(workdir, "localization")
  os.makedirs(os.path.join(out_dir, "overlays"), exist_ok=True)
  size = dataset.image_size
  indices = _box_image_indices(dataset, data_dir)
  rows = []
  for start in tqdm(range(0, len(indices), predict.CHUNK), desc="localize",
                    unit="chunk", dynamic_ncols=True, leave=False):
    chunk = indices[start:start + predict.CHUNK]
    records = [dataset.record(i) for i in chunk]
    images = np.stack([np.asarray(r["image"], np.uint8) for r in records])
    _, features = predictor(images)
    for index, record, image, feats in zip(chunk, records, images, features):
      boxes = record["boxes"]
      scale = size / np.asarray(record["source_size"], np.float64)  # (w, h)
      name = dataset.names[index]
      for cls, xywh in zip(boxes["label"], boxes["xywh"]):
        cls = int(cls)
        truth = (xywh[0] * scale[0], xywh[1] * scale[1], xywh[2] * scale[0],
                 xywh[3] * scale[1])
        heat, pred = cam_box(feats, kernel, cls, size, threshold, upsampling,
                             predictor.model.output_stride)
        row = {"image": name, "label": L.DISEASES[cls],
               "truth": [round(v, 2) for v in truth],
               "pred": None if pred is None else list(pred),
               "iou": 0.0 if pred is None else iou(pred, truth),
               "iobb": 0.0 if pred is None else iobb(pred, truth)}
        rows.append(row)
        if len(rows) <= max_overlays:
          overlay(image[..., 0], heat, truth, pred,
                  os.path.join(out_dir, "overlays",
                               f"{os.path.splitext(name)[0]}_{cls}.png"),
                  f"{name} {L.DISEASES[cls]}: IoU {row['iou']:.2f}, "
                  f"IoBB {row['iobb']:.2f}")
  if not rows:
    raise ValueError(f"no prepared image of {dataset.path} has boxes")
  summary: dict[str, Any] = {"boxes": len(rows), "threshold": threshold,
                             "upsampling": upsampling, "per_class": {}}
  for cls in sorted({r["label"] for r in rows}, key=L.DISEASES.index):
    sub = [r for r in rows if r["label"] == cls]
    summary["per_class"][cls] = {
        "boxes": len(sub),
        **{f"iou@{t}": float(np.mean([r["iou"] >= t for r in sub]))
           for t in THRESHOLDS},
        **{f"iobb@{t}": float(np.mean([r["iobb"] >= t for r in sub]))
           for t in THRESHOLDS}}
  for metric in ("iou", "iobb"):
    for t in THRESHOLDS:
      summary[f"{metric}@{t}"] = float(np.mean([r[metric] >= t
                                                for r in rows]))
  with open(os.path.join(out_dir, "localization.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["Image Index", "Finding Label", "truth_x", "truth_y",
                "truth_w", "truth_h", "pred_x", "pred_y", "pred_w", "pred_h",
                "IoU", "IoBB"])
    for r in rows:
      w.writerow([r["image"], r["label"], *r["truth"],
                  *(r["pred"] or ["", "", "", ""]), f"{r['iou']:.4f}",
                  f"{r['iobb']:.4f}"])
  with open(os.path.join(out_dir, "localization.json"), "w") as f:
    json.dump(summary, f, indent=2)
  summary["out_dir"] = out_dir
  return summary
