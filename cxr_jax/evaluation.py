"""`cxr-jax evaluate`: restore a run, predict a split data-parallel, and write
the paper's AUC table with bootstrap CIs, predictions, ROC curves and JSON.

Outputs, in `W/eval/<split>/`:
  auc.csv          per-class AUC, 95% CI, positives; then the mean (Table 2)
  predictions.csv  image, 14 probabilities, 14 labels
  roc.png          one ROC curve per class
  metrics.json     mean_auc, auc {class: value}, CIs, num_images, ...
The auxiliary "normal" output is dropped: evaluation reads the 14 diseases.
"""

from __future__ import annotations

import csv
import json
import os
import warnings
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from cxr_jax import checkpoint, inference, metrics, models
from cxr_jax import labels as L
from cxr_jax.data import pipeline, splits


# predictions.csv's header; `compare` reads files by it.
PREDICTION_COLUMNS = (["Image Index"] + [f"p_{d}" for d in L.DISEASES] +
                      [f"y_{d}" for d in L.DISEASES])


def predict_split(workdir: str, which: str = "best", split: str = "test",
                  data_dir: str | None = None, batch_size: int | None = None
                  ) -> dict[str, Any]:
  """{'names', 'probs' [N, 14], 'labels' [N, 14], 'config', 'step'}."""
  variables, config = checkpoint.restore(workdir, which)
  if data_dir:
    config.data_dir = data_dir
  dataset = pipeline.PreparedDataset(config.data_dir, config.image_size)
  names, _ = splits.for_dataset(config, dataset.names)
  if split not in names:
    raise ValueError(f"unknown split {split!r}; choose {sorted(names)}")
  names = names[split]
  if not names:
    raise ValueError(f"the {split} split has no prepared images")
  # The evaluation batch is independent of training's: a multiple of the
  # device count, so every device gets the same share.
  n = jax.device_count()
  batch_size = max(n, (batch_size or config.eval_batch_size) // n * n)
  forward = inference.Inference(models.from_config(config))
  batches = tqdm(pipeline.eval_batches(dataset, names, batch_size),
                 desc=f"predict {split}", unit="batch",
                 total=-(-len(names) // batch_size), dynamic_ncols=True,
                 leave=False, disable=jax.process_index() != 0)
  out = inference.predict_batches(forward, forward.put(variables), batches)
  return {"names": [dataset.names[i] for i in out["index"]],
          "probs": out["probs"][:, :L.NUM_DISEASES],
          "labels": out["labels"][:, :L.NUM_DISEASES], "config": config,
          "step": int(config.restored_step)}


def auc_table(labels, probs, num_resamples: int = 1000, seed: int = 0):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    ci = metrics.bootstrap_ci(labels, probs, num_resamples=num_resamples,
                              seed=seed)
  _, defined = metrics.mean_auc(ci.auc)
  return ci, defined


def format_table(ci, positives, paper: dict | None = None) -> str:
  """The AUC table; with a paper row, the paper's AUC in a last column."""
  reported = (paper or {}).get("auc")
  lines = [f"{'Pathology':20s} {'AUC':>7s}   {'95% CI':15s} {'positives':>9s}"
           + (f" {'paper':>7s}" if reported else "")]
  for c, (name, a, lo, hi, n) in enumerate(zip(L.DISEASES, ci.auc, ci.low,
                                               ci.high, positives)):
    a_txt = "    n/a" if np.isnan(a) else f"{a:7.4f}"
    ci_txt = "" if np.isnan(a) else f"[{lo:.4f}, {hi:.4f}]"
    lines.append(f"{name:20s} {a_txt}   {ci_txt:15s} {int(n):9d}" +
                 (f" {reported[c]:7.4f}" if reported else ""))
  mean_paper = (paper or {}).get("mean_auc")
  lines.append(f"{'AUC(Mean)':20s} {ci.mean:7.4f}   "
               f"[{ci.mean_low:.4f}, {ci.mean_high:.4f}]" +
               (f" {'':9s} {mean_paper:7.4f}" if mean_paper is not None
                else ""))
  return "\n".join(lines)


def plot_roc(labels, probs, path: str, title: str = "") -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from sklearn.metrics import roc_auc_score, roc_curve
  fig, axes = plt.subplots(4, 4, figsize=(13, 13))
  for c, ax in enumerate(axes.ravel()):
    if c >= L.NUM_DISEASES:
      ax.axis("off")
      continue
    y = labels[:, c] > 0.5
    ax.plot([0, 1], [0, 1], color="0.8", lw=1)
    if 0 < y.sum() < len(y):
      fpr, tpr, _ = roc_curve(y, probs[:, c])
      ax.plot(fpr, tpr, lw=1.5)
      ax.set_title(f"{L.DISEASES[c]} (AUC {roc_auc_score(y, probs[:, c]):.3f})",
                   fontsize=9)
    else:
      ax.set_title(f"{L.DISEASES[c]} (undefined)", fontsize=9)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.tick_params(labelsize=7)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def evaluate(workdir: str, which: str = "best", split: str = "test",
             data_dir: str | None = None, num_resamples: int = 1000,
             out_dir: str | None = None) -> dict[str, Any]:
  """The `evaluate` command; returns metrics.json's content."""
  if num_resamples < 1:  # checked before the split is predicted
    raise ValueError(f"the bootstrap needs at least one resample "
                     f"(--bootstrap), got {num_resamples}")
  pred = predict_split(workdir, which, split, data_dir)
  paper = pred["config"].get("paper")
  return write_results(out_dir or os.path.join(workdir, "eval", split),
                       pred["names"], pred["probs"], pred["labels"],
                       split=split, which=which, step=pred["step"],
                       num_resamples=num_resamples,
                       paper=paper.to_dict() if paper else None)


def write_results(out_dir: str, names, probs, labels, *, split: str,
                  which: str, step: int, num_resamples: int = 1000,
                  paper: dict | None = None) -> dict[str, Any]:
  """Writes auc.csv, predictions.csv, roc.png and metrics.json for one set
  of predictions; returns metrics.json's content plus 'table', 'out_dir'.
  `paper` (a configs/paper.py row's `config.paper`) is recorded, and its
  AUCs are printed beside the measured ones."""
  ci, defined = auc_table(labels, probs, num_resamples)
  os.makedirs(out_dir, exist_ok=True)
  positives = labels.sum(0)
  with open(os.path.join(out_dir, "auc.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["Pathology", "AUC", "CI_low", "CI_high", "positives"])
    for row in zip(L.DISEASES, ci.auc, ci.low, ci.high, positives):
      w.writerow([row[0]] + [f"{v:.4f}" for v in row[1:4]] + [int(row[4])])
    w.writerow(["AUC(Mean)", f"{ci.mean:.4f}", f"{ci.mean_low:.4f}",
                f"{ci.mean_high:.4f}", int(labels.shape[0])])
  with open(os.path.join(out_dir, "predictions.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(PREDICTION_COLUMNS)
    # Nine significant digits give back the float32 exactly: six decimals
    # made confident negatives (1e-7 and 3e-7) tie at 0.000000, so an AUC
    # or DeLong test computed from this file (`compare`) differed from
    # metrics.json's.
    for name, p, y in zip(names, probs, labels):
      w.writerow([name] + [f"{v:.9g}" for v in p] + [int(v) for v in y])
  plot_roc(labels, probs, os.path.join(out_dir, "roc.png"),
           f"{split} split, step {step}")
  result = {
      # None, not NaN, when no class has both labels (JSON has no NaN).
      "mean_auc": None if np.isnan(ci.mean) else float(ci.mean),
      "defined_classes": defined,
      "mean_auc_ci": [float(ci.mean_low), float(ci.mean_high)],
      "auc": {d: (None if np.isnan(a) else float(a))
              for d, a in zip(L.DISEASES, ci.auc)},
      "auc_ci": {d: [float(lo), float(hi)] for d, lo, hi in
                 zip(L.DISEASES, ci.low, ci.high)},
      "positives": {d: int(n) for d, n in zip(L.DISEASES, positives)},
      "num_images": int(labels.shape[0]), "split": split, "which": which,
      "step": step, "bootstrap_resamples": num_resamples,
      "paper": paper,
  }
  with open(os.path.join(out_dir, "metrics.json"), "w") as f:
    json.dump(result, f, indent=2)
  result["table"] = format_table(ci, positives, paper)
  result["out_dir"] = out_dir
  return result
