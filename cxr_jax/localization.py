"""`cxr-jax localize`: CAM boxes scored against ground-truth boxes (the
paper's Section IV-G; Wang et al. 2017's Table 3 protocol).

For every prepared image with boxes and each of its boxes' classes, the class
activation map (`cxr_jax.cam`, from the model's class maps) is upsampled to
the image, scaled to 0..255 and thresholded (200 by default); the bounding
box of the largest connected component is the prediction. It is scored by
IoU and by IoBB (intersection over the predicted box), and counted correct at
T in {0.1, 0.25, 0.5, 0.75}.

Beside each accuracy, `chance_*` scores the same predicted boxes against the
boxes of the same class on the *other* images: what maps that ignore where
the finding is, but draw boxes of the same sizes in the same places, would
score. IoBB rewards small boxes anywhere inside a finding, and findings sit
in the lungs, so a bare accuracy says little without this control.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Any

import numpy as np
from tqdm import tqdm

from cxr_jax import cam, inference
from cxr_jax import labels as L
from cxr_jax.data import metadata, pipeline

THRESHOLDS = (0.1, 0.25, 0.5, 0.75)


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


def chance_accuracy(rows: list[dict[str, Any]]
                    ) -> tuple[dict[str, float], int]:
  """IoU/IoBB accuracy at each threshold with every predicted box scored
  against the truth of each other image's box of its class, averaged per row
  and then over rows. A row whose class has boxes on no other image has no
  control and is left out; the second value counts the rows kept."""
  per_row = {f"{m}@{t}": [] for m in ("iou", "iobb") for t in THRESHOLDS}
  for r in rows:
    others = [o["truth"] for o in rows
              if o["label"] == r["label"] and o["image"] != r["image"]]
    if not others:
      continue
    for metric, score in (("iou", iou), ("iobb", iobb)):
      values = [0.0 if r["pred"] is None else score(r["pred"], truth)
                for truth in others]
      for t in THRESHOLDS:
        per_row[f"{metric}@{t}"].append(np.mean([v >= t for v in values]))
  kept_rows = len(per_row[f"iou@{THRESHOLDS[0]}"])
  return ({k: float(np.mean(v)) if v else float("nan")
           for k, v in per_row.items()}, kept_rows)


def _box_image_indices(dataset: pipeline.PreparedDataset, data_dir: str
                       ) -> list[int]:
  """Records of the images the box list names, in dataset order: read from
  the metadata copy that `prepare` keeps, so no film without boxes is
  decoded."""
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
  cam.check_threshold(threshold)
  predictor = inference.Predictor(workdir, which)
  data_dir = data_dir or predictor.config.data_dir
  dataset = pipeline.PreparedDataset(data_dir, predictor.size)
  out_dir = out_dir or os.path.join(workdir, "localization")
  os.makedirs(os.path.join(out_dir, "overlays"), exist_ok=True)
  size = dataset.image_size
  indices = _box_image_indices(dataset, data_dir)
  rows = []
  chunk_size = predictor.batch_size
  for start in tqdm(range(0, len(indices), chunk_size), desc="localize",
                    unit="chunk", dynamic_ncols=True, leave=False):
    chunk = indices[start:start + chunk_size]
    records = [dataset.record(i) for i in chunk]
    images = np.stack([np.asarray(r["image"], np.uint8) for r in records])
    _, class_maps = predictor(images)
    for index, record, image, maps in zip(chunk, records, images, class_maps):
      boxes = record["boxes"]
      scale = size / np.asarray(record["source_size"], np.float64)  # (w, h)
      name = dataset.names[index]
      for cls, xywh in zip(boxes["label"], boxes["xywh"]):
        cls = int(cls)
        truth = (xywh[0] * scale[0], xywh[1] * scale[1], xywh[2] * scale[0],
                 xywh[3] * scale[1])
        heat, pred = cam.cam_box(maps[..., cls], size, predictor.grid,
                                 threshold, upsampling)
        row = {"image": name, "label": L.DISEASES[cls],
               "truth": [round(v, 2) for v in truth],
               "pred": None if pred is None else list(pred),
               "iou": 0.0 if pred is None else iou(pred, truth),
               "iobb": 0.0 if pred is None else iobb(pred, truth)}
        rows.append(row)
        if len(rows) <= max_overlays:
          cam.overlay(image[..., 0], heat, truth, pred,
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
  chance, summary["chance_boxes"] = chance_accuracy(rows)
  summary.update({f"chance_{k}": v for k, v in chance.items()})
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
