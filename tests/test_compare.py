"""`cxr-jax compare` on evaluation folders written by `evaluate`'s writer."""

import csv
import os

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from cxr_jax import compare, evaluation, metrics
from cxr_jax import labels as L


def _labels(rng, n):
  y = (rng.random((n, L.NUM_DISEASES)) < 0.2).astype(np.float64)
  y[:3], y[3:6] = 1, 0  # both values in every class
  return y


def _scores(rng, y, noise):
  return 1 / (1 + np.exp(-(2 * y - 1 + rng.normal(0, noise, y.shape))))


def _write(folder, names, probs, labels, order=None):
  order = np.arange(len(names)) if order is None else order
  return evaluation.write_results(
      str(folder), [names[i] for i in order], probs[order], labels[order],
      split="test", which="best", step=1, num_resamples=20)


def _sklearn_aucs(y, p):
  aucs = [roc_auc_score(y[:, c], p[:, c]) for c in range(L.NUM_DISEASES)]
  return np.append(aucs, np.mean(aucs))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("runs")
  rng = np.random.default_rng(0)
  n = 400
  names = [f"{i:08d}_000.png" for i in range(n)]
  y = _labels(rng, n)
  good, poor = _scores(rng, y, 0.8), _scores(rng, y, 2.5)
  _write(root / "good", names, good, y)
  # Written in another row order: DeLong must pair images by name.
  _write(root / "poor", names, poor, y, order=rng.permutation(n))
  trials = []
  for t in range(3):  # three splits of one experiment: other images each
    tn = [f"{t + 1}{i:07d}_000.png" for i in range(n)]
    ty = _labels(rng, n)
    tp = _scores(rng, ty, 1.2)
    _write(root / f"trial{t}", tn, tp, ty)
    trials.append(_sklearn_aucs(ty, tp))
  return root, y, good, poor, np.stack(trials)


def test_compare_tables_trials_delong_and_chart(runs, tmp_path):
  root, y, good, poor, trials = runs
  out = tmp_path / "cmp"
  paths = [str(root / d) for d in ("good", "poor", "trial0", "trial1",
                                   "trial2")]
  result = compare.compare(paths, ["good", "poor", "cw", "cw", "cw"],
                           out_dir=str(out))

  with open(out / "auc.csv") as f:
    rows = list(csv.reader(f))
  assert rows[0] == ["Pathology", "good", "poor", "cw", "cw", "cw", "best"]
  table = np.array([[float(v) for v in r[1:6]] for r in rows[1:]])
  want = np.stack([_sklearn_aucs(y, good), _sklearn_aucs(y, poor),
                   *trials], axis=1)
  np.testing.assert_allclose(table, want, atol=6e-5)  # 4 decimals
  assert all(r[-1] == "good" for r in rows[1:])

  cw = result["experiments"]["cw"]
  assert cw["trials"] == 3
  assert cw["mean_auc"] == pytest.approx(trials[:, -1].mean(), abs=1e-4)
  assert cw["mean_auc_sd"] == pytest.approx(trials[:, -1].std(ddof=1),
                                            abs=1e-4)
  md = result["markdown"]
  assert "| **AUC(Mean)** | **" in md and "cw (n=3)" in md
  assert f"{trials[:, -1].mean():.4f} ± {trials[:, -1].std(ddof=1):.4f}" in md

  # Only good vs poor share images; trials of other images are not paired.
  assert {(t["run_a"], t["run_b"]) for t in result["delong"]} == {
      ("good", "poor")}
  assert len(result["delong"]) == L.NUM_DISEASES
  for t in result["delong"]:
    c = L.DISEASES.index(t["class"])
    # predictions.csv keeps 9 significant digits (a float32 exactly; these
    # scores are float64): the reference sees the scores as written.
    written = lambda p: np.array([float(f"{v:.9g}") for v in p])
    ref = metrics.delong_test(y[:, c], written(good[:, c]),
                              written(poor[:, c]))
    assert t["z"] == pytest.approx(ref.z, rel=1e-6)
    assert t["p_value"] == pytest.approx(ref.p_value, rel=1e-6, abs=1e-300)
  with open(out / "bar.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert os.path.exists(out / "summary.csv") and os.path.exists(
      out / "delong.csv")


def test_compare_names_the_folder_without_an_evaluation(runs, tmp_path):
  root = runs[0]
  with pytest.raises(FileNotFoundError, match="nothing_here.*cxr-jax evaluate"):
    compare.compare([str(root / "good"), str(tmp_path / "nothing_here")],
                    out_dir=str(tmp_path / "o"))
  with pytest.raises(ValueError, match="--names has 1 entries for 2 runs"):
    compare.compare([str(root / "good"), str(root / "poor")], ["a"],
                    out_dir=str(tmp_path / "o"))


def test_paper_rows_print_beside_the_measured_columns(runs, tmp_path):
  """A run trained from configs/paper.py records its row in metrics.json;
  evaluate prints the paper's AUCs and compare adds the row as a column."""
  from configs import paper
  root, y, good, _, _ = runs
  row = paper.get_config("table2_cwcel_at").paper.to_dict()
  names = [f"{i:08d}_000.png" for i in range(len(y))]
  result = evaluation.write_results(str(tmp_path / "p"), names, good, y,
                                    split="test", which="best", step=1,
                                    num_resamples=20, paper=row)
  assert "paper" in result["table"].splitlines()[0]
  assert "0.8325" in result["table"].splitlines()[-1]
  out = compare.compare([str(tmp_path / "p"), str(root / "poor")],
                        ["ours", "poor"], out_dir=str(tmp_path / "cmp"))
  lines = out["markdown"].splitlines()
  header = next(l for l in lines if l.startswith("| Pathology"))
  assert header.endswith("| paper: Table 2 CW-CEL(AT) |")
  hernia = next(l for l in lines if l.startswith("| Hernia"))
  assert hernia.endswith("| 0.8728 |")
  mean = next(l for l in lines if l.startswith("| **AUC(Mean)**"))
  assert mean.endswith("| 0.8325 |")


def test_predictions_csv_keeps_the_ranking_of_confident_scores(tmp_path):
  """A trained model's negatives sit at 1e-7 and below: the file must give
  back each float32 exactly, or `compare` ranks ties that `evaluate` did
  not see and the two disagree on the AUC."""
  rng = np.random.default_rng(1)
  y = _labels(rng, 200)
  probs = _scores(rng, y, 1.0).astype(np.float32)
  probs[y == 0] = (10 ** rng.uniform(-9, -6, int((y == 0).sum()))).astype(
      np.float32)
  names = [f"{i:05d}.png" for i in range(len(y))]
  result = _write(tmp_path / "p", names, probs, y)
  with open(tmp_path / "p" / "predictions.csv") as f:
    rows = list(csv.reader(f))[1:]
  back = np.array([[float(v) for v in r[1:1 + L.NUM_DISEASES]] for r in rows],
                  np.float32)
  np.testing.assert_array_equal(back, probs)
  # The AUC from the file is the AUC evaluate reported.
  for c, d in enumerate(L.DISEASES):
    assert result["auc"][d] == pytest.approx(
        roc_auc_score(y[:, c], back[:, c]), abs=1e-12)
