"""`cxr-jax compare`: runs side by side, as the paper's tables set them.

Each input is a run's workdir (its `eval/<split>/` is read) or an evaluation
folder itself; `cxr-jax evaluate` writes both files this reads:
`metrics.json` and `predictions.csv`.

* Per-class AUC, one column per run, the best of each row marked (Tables 1,
  2, 4 and 6). Runs given the same name are trials of one experiment (Table
  3's six random splits): their column is the mean ± sample standard
  deviation over the trials.
* DeLong's test for every pair of runs scored on the same images (matched by
  image name), per class.
* `bar.png`: the mean AUC per experiment, with the trials' standard
  deviation as error bars (Figure 6).
* Runs trained from a `configs/paper.py` row carry the paper's AUCs in their
  metrics.json; each such row gets a column "paper: <column>" beside the
  measured ones.

Outputs, in `--out`: `compare.md`, `auc.csv` (per run), `summary.csv` (per
experiment), `delong.csv`, `bar.png`.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
from typing import Any, Sequence

import numpy as np

from cxr_jax import labels as L
from cxr_jax import metrics
from cxr_jax.evaluation import PREDICTION_COLUMNS

ROWS = (*L.DISEASES, "AUC(Mean)")


class Run:
  """One evaluated run: its AUCs and its per-image predictions."""

  def __init__(self, path: str, name: str, split: str = "test"):
    folder = path
    if not os.path.exists(os.path.join(folder, "metrics.json")):
      folder = os.path.join(path, "eval", split)
    metrics_path = os.path.join(folder, "metrics.json")
    if not os.path.exists(metrics_path):
      raise FileNotFoundError(
          f"{path}: no metrics.json in it or in {folder}; run "
          f"`cxr-jax evaluate --workdir {path} --split {split}` first")
    m = _read_metrics(metrics_path)
    self.path, self.name, self.folder = path, name, folder
    self.auc = np.array([_auc(m["auc"][d], metrics_path) for d in L.DISEASES],
                        np.float64)
    self.mean_auc = _auc(m["mean_auc"], metrics_path)
    self.paper = m.get("paper") if isinstance(m.get("paper"), dict) else None
    self.names, self.probs, self.labels = _read_predictions(
        os.path.join(folder, "predictions.csv"))

  def values(self) -> np.ndarray:
    """The 14 class AUCs and the mean, in ROWS order."""
    return np.append(self.auc, self.mean_auc)


def _read_metrics(path: str) -> dict[str, Any]:
  """metrics.json as `evaluate` writes it, or a ValueError naming the file
  and what is wrong with it."""
  try:
    with open(path) as f:
      m = json.load(f)
  except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
    raise ValueError(f"{path}: not the JSON `cxr-jax evaluate` writes: "
                     f"{e}") from None
  if not isinstance(m, dict):
    raise ValueError(f"{path}: expected a JSON object, got "
                     f"{type(m).__name__}")
  for key in ("mean_auc", "auc"):
    if key not in m:
      raise ValueError(f"{path}: field {key!r} is missing")
  if not isinstance(m["auc"], dict):
    raise ValueError(f"{path}: 'auc' is not a mapping of class to AUC")
  missing = [d for d in L.DISEASES if d not in m["auc"]]
  if missing:
    raise ValueError(f"{path}: 'auc' lacks {missing}")
  return m


def _auc(value, path: str) -> float:
  """An AUC from metrics.json: a number, or null where it is undefined."""
  if value is None:
    return np.nan
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ValueError(f"{path}: an AUC is {value!r}, not a number")
  return float(value)


def _read_predictions(path: str):
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} is missing; `cxr-jax evaluate` writes it")
  with open(path, newline="") as f:
    reader = csv.reader(f)
    header = next(reader, None)
    if header != PREDICTION_COLUMNS:
      raise ValueError(f"{path}: unexpected header; expected the columns "
                       f"`cxr-jax evaluate` writes")
    rows = list(reader)
  short = [i + 2 for i, r in enumerate(rows)
           if len(r) != len(PREDICTION_COLUMNS)]
  if short:
    raise ValueError(f"{path}: line {short[0]} does not have the "
                     f"{len(PREDICTION_COLUMNS)} columns of the header")
  names = [r[0] for r in rows]
  try:
    table = np.array([[float(v) for v in r[1:]] for r in rows], np.float64)
  except ValueError as e:
    raise ValueError(f"{path}: a non-numeric probability or label: {e}")
  if len(set(names)) != len(names):
    raise ValueError(f"{path}: an image appears more than once")
  table = table.reshape(len(rows), 2 * L.NUM_DISEASES)
  return names, table[:, :L.NUM_DISEASES], table[:, L.NUM_DISEASES:]


def _experiments(runs: Sequence[Run]) -> dict[str, list[Run]]:
  groups: dict[str, list[Run]] = {}
  for r in runs:
    groups.setdefault(r.name, []).append(r)
  return groups


def _mean_sd(runs: Sequence[Run]) -> tuple[np.ndarray, np.ndarray]:
  values = np.stack([r.values() for r in runs])
  mean = np.nanmean(values, axis=0)
  sd = (np.nanstd(values, axis=0, ddof=1) if len(runs) > 1
        else np.full(values.shape[1], np.nan))
  return mean, sd


def delong_pairs(runs: Sequence[Run]) -> list[dict[str, Any]]:
  """DeLong per class for every pair of runs that share their images."""
  out = []
  for a, b in itertools.combinations(runs, 2):
    if set(a.names) != set(b.names):
      continue
    order = {n: i for i, n in enumerate(b.names)}
    idx = np.array([order[n] for n in a.names])
    if not np.array_equal(a.labels, b.labels[idx]):
      raise ValueError(f"{a.folder} and {b.folder} hold the same images with "
                       f"different labels")
    tests = metrics.delong_per_class(a.labels, a.probs, b.probs[idx],
                                     L.DISEASES)
    for cls, t in tests.items():
      out.append({"run_a": a.name, "run_b": b.name, "path_a": a.path,
                  "path_b": b.path, "class": cls, "auc_a": t.auc_a,
                  "auc_b": t.auc_b, "z": t.z, "p_value": t.p_value})
  return out


def _fmt(mean: float, sd: float) -> str:
  if np.isnan(mean):
    return "n/a"
  return f"{mean:.4f}" if np.isnan(sd) else f"{mean:.4f} ± {sd:.4f}"


def bar_chart(names, means, sds, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(max(4, 1.1 * len(names) + 2), 3.6))
  x = np.arange(len(names))
  errors = np.where(np.isnan(sds), 0, sds)
  ax.bar(x, means, yerr=errors, capsize=4, color="#4c72b0")
  for xi, m in zip(x, means):
    ax.text(xi, m + 0.003, f"{m:.3f}", ha="center", va="bottom", fontsize=8)
  ax.set_xticks(x)
  ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
  low = max(0.0, float(np.nanmin(means - errors)) - 0.05)
  ax.set_ylim(low, min(1.0, float(np.nanmax(means + errors)) + 0.03))
  ax.set_ylabel("mean AUC (14 diseases)")
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def _paper_columns(runs: Sequence[Run]) -> list[dict]:
  """The distinct paper rows the runs were trained from, in run order."""
  seen, out = set(), []
  for r in runs:
    if r.paper and r.paper.get("auc") and r.paper["row"] not in seen:
      seen.add(r.paper["row"])
      out.append(r.paper)
  return out


def compare(paths: Sequence[str], names: Sequence[str] | None = None,
            split: str = "test", out_dir: str = "compare",
            alpha: float = 0.05) -> dict[str, Any]:
  """The `compare` command; returns {'markdown', 'experiments', 'delong'}."""
  if not paths:
    raise ValueError("compare needs at least one run")
  if names is not None and len(names) != len(paths):
    raise ValueError(f"--names has {len(names)} entries for {len(paths)} runs")
  names = list(names) if names else [os.path.basename(os.path.normpath(p))
                                     for p in paths]
  runs = [Run(p, n, split) for p, n in zip(paths, names)]
  groups = _experiments(runs)
  stats = {n: _mean_sd(rs) for n, rs in groups.items()}
  os.makedirs(out_dir, exist_ok=True)

  with open(os.path.join(out_dir, "auc.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["Pathology", *[r.name for r in runs], "best"])
    per_run = np.stack([r.values() for r in runs], axis=1)
    for row, values in zip(ROWS, per_run):
      best = (runs[int(np.nanargmax(values))].name
              if not np.all(np.isnan(values)) else "")
      w.writerow([row, *[f"{v:.4f}" for v in values], best])

  exp_names = list(groups)
  means = np.stack([stats[n][0] for n in exp_names], axis=1)  # [rows, E]
  sds = np.stack([stats[n][1] for n in exp_names], axis=1)
  with open(os.path.join(out_dir, "summary.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["Pathology", *[c for n in exp_names
                               for c in (f"{n}_mean", f"{n}_sd")], "best"])
    for row, m, s in zip(ROWS, means, sds):
      best = exp_names[int(np.nanargmax(m))] if not np.all(np.isnan(m)) else ""
      w.writerow([row, *[f"{v:.4f}" for pair in zip(m, s) for v in pair],
                  best])

  trials = {n: len(rs) for n, rs in groups.items()}
  header = [f"{n} (n={trials[n]})" if trials[n] > 1 else n for n in exp_names]
  papers = _paper_columns(runs)
  header += [f"paper: {p['table']} {p['column']}" for p in papers]
  md = [f"# Comparison on the {split} split", "",
        "AUC per class; the best of each row in bold. "
        + ("Columns with n > 1 are mean ± SD over trials." if
           max(trials.values()) > 1 else ""), "",
        "| Pathology | " + " | ".join(header) + " |",
        "|---|" + "---|" * len(header)]
  for row, m, s in zip(ROWS, means, sds):
    cells = [_fmt(a, b) for a, b in zip(m, s)]
    if not np.all(np.isnan(m)):
      best = np.flatnonzero(m == np.nanmax(m))
      for i in best:
        cells[i] = f"**{cells[i]}**"
    r = ROWS.index(row)
    cells += [_fmt(p["auc"][r] if r < L.NUM_DISEASES else p["mean_auc"],
                   np.nan) for p in papers]
    label = f"**{row}**" if row == "AUC(Mean)" else row
    md.append(f"| {label} | " + " | ".join(cells) + " |")

  tests = delong_pairs(runs)
  with open(os.path.join(out_dir, "delong.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["run_a", "run_b", "class", "auc_a", "auc_b", "z", "p_value"])
    for t in tests:
      w.writerow([t["run_a"], t["run_b"], t["class"], f"{t['auc_a']:.4f}",
                  f"{t['auc_b']:.4f}", f"{t['z']:.3f}", f"{t['p_value']:.4g}"])
  md += ["", "## DeLong tests", ""]
  if tests:
    md += [f"Pairs of runs scored on the same images; two-sided p-values, "
           f"p < {alpha} in bold.", "",
           "| run A | run B | class | AUC A | AUC B | z | p |",
           "|---|---|---|---|---|---|---|"]
    for t in tests:
      p = f"{t['p_value']:.3g}"
      p = f"**{p}**" if t["p_value"] < alpha else p
      md.append(f"| {t['run_a']} | {t['run_b']} | {t['class']} | "
                f"{t['auc_a']:.4f} | {t['auc_b']:.4f} | {t['z']:.2f} | {p} |")
  else:
    md.append("No two runs were scored on the same images, so no pair was "
              "tested.")
  mean_row = ROWS.index("AUC(Mean)")
  bar_chart(exp_names, means[mean_row], sds[mean_row],
            os.path.join(out_dir, "bar.png"))
  md += ["", "![mean AUC per run](bar.png)", ""]
  markdown = "\n".join(md)
  with open(os.path.join(out_dir, "compare.md"), "w") as f:
    f.write(markdown)
  return {"markdown": markdown, "out_dir": out_dir, "delong": tests,
          "experiments": {n: {"trials": trials[n],
                              "mean_auc": float(stats[n][0][mean_row]),
                              "mean_auc_sd": float(stats[n][1][mean_row])}
                          for n in exp_names}}
