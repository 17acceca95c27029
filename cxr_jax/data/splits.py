"""Train/val/test splits as lists of image names over one prepared dataset.

Schemes:

* `paper`: the paper's image-level random 70/10/20 (Xu et al. Section IV-E);
  trials 0-5 of Table 3 are seeds 0-5. Images of one patient can land in two
  splits; the summary counts that leakage instead of hiding it.
* `patient`: a patient-wise random 70/10/20 of the patients (no leakage).
* `official`: the NIH test list; validation is 10% of the train/val list's
  patients, drawn with the seed.

Determinism: rows are sorted by image name (patients by id) before numpy's
PCG64 permutes them, so the same inputs and seed give byte-identical files on
any machine. Changing the scheme or seed never touches images.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from cxr_jax import labels as L
from cxr_jax.data import metadata
from cxr_jax.data.metadata import Entries, NIHMetadata

SCHEMES = ("paper", "patient", "official")
SPLITS = ("train", "val", "test")
FRACTIONS = (0.7, 0.1, 0.2)


@dataclasses.dataclass
class Splits:
  train: list[str]
  val: list[str]
  test: list[str]

  def as_dict(self) -> dict[str, list[str]]:
    return {"train": self.train, "val": self.val, "test": self.test}


def _cut(n: int, fractions=FRACTIONS) -> tuple[int, int]:
  n_train = int(round(n * fractions[0]))
  n_val = int(round(n * fractions[1]))
  return n_train, n_train + n_val


def make_splits(meta: NIHMetadata, scheme: str, seed: int,
                view: str | None = None) -> Splits:
  """The splits of `scheme` with `seed`; `view` keeps only 'PA' or 'AP'."""
  if scheme not in SCHEMES:
    raise ValueError(f"unknown split scheme {scheme!r}; choose {SCHEMES}")
  entries = meta.entries
  keep = np.ones(len(entries), bool)
  if view:
    if view not in ("PA", "AP"):
      raise ValueError(f"view must be PA, AP or empty (both), got {view!r}")
    keep = entries.view == view
  order = np.argsort(entries.names, kind="stable")
  order = order[keep[order]]
  names = entries.names[order]
  patients = entries.patient_id[order]
  rng = np.random.default_rng(seed)

  if scheme == "paper":
    perm = rng.permutation(len(names))
    a, b = _cut(len(names))
    parts = [names[perm[:a]], names[perm[a:b]], names[perm[b:]]]
  elif scheme == "patient":
    unique = np.unique(patients)
    perm = unique[rng.permutation(len(unique))]
    a, b = _cut(len(unique))
    groups = [set(perm[:a].tolist()), set(perm[a:b].tolist()),
              set(perm[b:].tolist())]
    parts = [names[np.isin(patients, list(g))] for g in groups]
  else:
    if meta.test is None or meta.train_val is None:
      raise FileNotFoundError("the official scheme needs train_val_list.txt "
                              "and test_list.txt beside the CSV")
    in_test = np.isin(names, meta.test)
    in_train_val = np.isin(names, meta.train_val)
    tv_patients = np.unique(patients[in_train_val])
    perm = tv_patients[rng.permutation(len(tv_patients))]
    val_patients = perm[:int(round(0.1 * len(perm)))]
    is_val = in_train_val & np.isin(patients, val_patients)
    parts = [names[in_train_val & ~is_val], names[is_val], names[in_test]]
  return Splits(*[sorted(p.tolist()) for p in parts])


def summarize(entries: Entries, splits: Splits, **info) -> dict:
  """Images, patients and positives per class in each split, and leakage."""
  index = entries.index
  out = dict(info)
  seen: dict[int, set[str]] = {}
  for split, names in splits.as_dict().items():
    rows = np.array([index[n] for n in names], np.int64)
    sub = entries.select(rows) if len(rows) else None
    pids = set() if sub is None else set(sub.patient_id.tolist())
    for p in pids:
      seen.setdefault(p, set()).add(split)
    out[split] = {
        "images": len(names),
        "patients": len(pids),
        "normal": 0 if sub is None else int(sub.normal.sum()),
        "positives": {d: (0 if sub is None else int(sub.labels[:, i].sum()))
                      for i, d in enumerate(L.DISEASES)},
    }
  out["patients_in_more_than_one_split"] = sum(len(s) > 1
                                               for s in seen.values())
  return out


def write_splits(out_dir: str, splits: Splits, summary: dict) -> None:
  """Writes train.txt, val.txt, test.txt and summary.json."""
  os.makedirs(out_dir, exist_ok=True)
  for split, names in splits.as_dict().items():
    with open(os.path.join(out_dir, f"{split}.txt"), "w", newline="\n") as f:
      f.write("".join(n + "\n" for n in names))
  with open(os.path.join(out_dir, "summary.json"), "w", newline="\n") as f:
    json.dump(summary, f, indent=2, sort_keys=True)
    f.write("\n")


def read_splits(split_dir: str) -> Splits:
  """Reads a folder written by `cxr-jax splits`."""
  parts = []
  for split in SPLITS:
    path = os.path.join(split_dir, f"{split}.txt")
    if not os.path.exists(path):
      raise FileNotFoundError(f"split file missing: {path}")
    with open(path) as f:
      parts.append([line.strip() for line in f if line.strip()])
  return Splits(*parts)


def for_dataset(config, prepared_names) -> tuple[dict[str, list[str]],
                                                 dict[str, int]]:
  """A run's train/val/test names restricted to the prepared images, with
  the count of each split's images that were not prepared (e.g. a dataset
  built with --allow_missing). From `config.split_dir`, or made from the
  prepared dataset's metadata copy with the config's scheme and seed."""
  if config.split_dir:
    parts = read_splits(config.split_dir)
  else:
    meta = metadata.read_all(config.data_dir)
    parts = make_splits(meta, config.split_scheme, config.split_seed,
                        config.view or None)
  present = set(prepared_names)
  names, dropped = {}, {}
  for split, listed in parts.as_dict().items():
    names[split] = [n for n in listed if n in present]
    dropped[split] = len(listed) - len(names[split])
  return names, dropped


def run(data_dir: str, scheme: str, seed: int, out_dir: str,
        view: str | None = None) -> dict:
  """The `cxr-jax splits` command: returns the summary it wrote."""
  meta = metadata.read_all(data_dir)
  splits = make_splits(meta, scheme, seed, view)
  summary = summarize(meta.entries, splits, scheme=scheme, seed=seed,
                      view=view or "both")
  write_splits(out_dir, splits, summary)
  return summary
