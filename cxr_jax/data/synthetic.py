"""A synthetic twin of ChestX-ray14: the official layout, quirks included,
with a learnable, localizable signal.

`synthesize(out, num_images, image_size, seed)` writes:

* `images/*.png`: 8-bit gray films (a few RGBA with R=G=B, as in the real
  release). Each looks roughly like a chest film: a soft body, two darker
  lungs with ribs, a mediastinum, noise, and per-image jitter of position,
  brightness and contrast.
* `Data_Entry_2017.csv` in the 2017 layout: the header whose bracketed names
  split into extra fields, a trailing empty column, `058Y` ages,
  `Pleural_Thickening`, `No Finding`.
* `BBox_List_2017.csv` with `Infiltrate` and the `Bbox [x,y,w,h],,,` header;
  boxes in the PNG's pixel coordinates, for the test images of the eight
  classes NIH boxed.
* `train_val_list.txt` / `test_list.txt`: patient-disjoint, with every box
  image in the test list, as in the release.

Each disease plants a texture of its own (disc, rings, stripes in four
directions, checkers, dots, a cross, haze, dark patches) at a place drawn
anew for every film, anywhere in either lung; the recorded box is the
pattern's extent. Label frequencies follow the real imbalance, floored at
`min_prevalence` so that every class has examples to learn from: about half
the images are `No Finding` and Hernia is the rarest.
"""

from __future__ import annotations

import csv
import functools
import multiprocessing
import os
from typing import NamedTuple

import numpy as np
import tqdm
from PIL import Image

from cxr_jax import labels as L

# Real prevalences (Data_Entry_2017_v2020.csv counts / 112,120 images).
REAL_COUNTS = {
    "Atelectasis": 11559, "Cardiomegaly": 2776, "Effusion": 13317,
    "Infiltration": 19894, "Mass": 5782, "Nodule": 6331, "Pneumonia": 1431,
    "Pneumothorax": 5302, "Consolidation": 4667, "Edema": 2303,
    "Emphysema": 2516, "Fibrosis": 1686, "Pleural Thickening": 3385,
    "Hernia": 227,
}
BOXED = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass",
         "Nodule", "Pneumonia", "Pneumothorax")


class Pattern(NamedTuple):
  radius: float    # fraction of the size
  texture: str     # one of TEXTURES, unique to the disease
  amplitude: float  # added brightness; negative textures darken


# One pattern per disease: (disease, radius, texture, amplitude), in
# cxr_jax.labels.DISEASES order. Each disease has a texture no other disease
# has, and its place is drawn anew for every film (anywhere in either lung).
# A model can only find a disease by its look, not by a fixed pixel
# position, so a correct class activation map has to point at the finding:
# that is what makes the CAM boxes a test.
_PATTERN_ROWS = (
    ("Atelectasis", 0.10, "stripes_h", 0.35),
    ("Cardiomegaly", 0.12, "disc", 0.30),
    ("Effusion", 0.10, "haze", 0.45),
    ("Infiltration", 0.11, "checker", 0.35),
    ("Mass", 0.09, "ring", 0.45),
    ("Nodule", 0.08, "bullseye", 0.45),
    ("Pneumonia", 0.10, "stripes_d", 0.40),
    ("Pneumothorax", 0.10, "dark", 0.35),
    ("Consolidation", 0.09, "dots", 0.45),
    ("Edema", 0.10, "stripes_v", 0.35),
    ("Emphysema", 0.09, "dark_ring", 0.45),
    ("Fibrosis", 0.09, "cross", 0.40),
    ("Pleural Thickening", 0.09, "stripes_a", 0.40),
    ("Hernia", 0.09, "dark_checker", 0.40),
)
assert tuple(row[0] for row in _PATTERN_ROWS) == L.DISEASES
PATTERNS = tuple(Pattern(*row[1:]) for row in _PATTERN_ROWS)
assert len({p.texture for p in PATTERNS}) == L.NUM_DISEASES
LUNGS = ((0.31, 0.48), (0.69, 0.48))  # centres; semi-axes 0.17 x 0.31
LUNG_AXES = (0.17, 0.31)


def prevalences(min_prevalence: float = 0.015) -> np.ndarray:
  """Per-disease probabilities: the real ones, floored (Hernia stays rarest)."""
  real = np.array([REAL_COUNTS[d] for d in L.DISEASES]) / 112_120
  p = np.maximum(real, min_prevalence)
  p[L.DISEASES.index("Hernia")] = min(p.min(), real.max()) * 0.999
  return p


def _film(rng, size: int) -> np.ndarray:
  """A chest-like film in [0, 1] without findings."""
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
  dx, dy = rng.normal(0, 0.015, 2)
  soft = lambda d, w=0.03: 1 / (1 + np.exp(d / w))
  body = soft(((xx - 0.5 - dx) / 0.46) ** 2 + ((yy - 0.55 - dy) / 0.55) ** 2
              - 1, 0.08)
  lungs = sum(soft(((xx - cx - dx) / 0.17) ** 2 + ((yy - 0.48 - dy) / 0.31)
                   ** 2 - 1, 0.06) for cx in (0.31, 0.69))
  ribs = 0.04 * np.sin(2 * np.pi * (yy - dy) * 11) * lungs
  img = 0.15 + 0.55 * body - 0.32 * lungs + ribs
  img += 0.12 * soft(((xx - 0.5 - dx) / 0.08) ** 2 - 1, 0.2) * body  # spine
  return img.astype(np.float32)


def _texture(name: str, d, xx, yy, period: float) -> np.ndarray:
  """The pattern inside the unit disc d <= 1 (xx, yy in pixels)."""
  wave = lambda u: np.sin(2 * np.pi * u / period)
  square = lambda u: 0.5 + 0.5 * np.sign(u)
  ring = lambda at, width: np.clip(1 - np.abs(d - at) / width, 0, 1)
  if name == "disc":
    return np.ones_like(d)
  if name == "ring":
    return ring(0.7, 0.25)
  if name == "bullseye":
    return np.maximum(d < 0.3, ring(0.8, 0.15))
  if name == "dark_ring":
    return -ring(0.65, 0.3)
  if name == "stripes_h":
    return square(wave(yy))
  if name == "stripes_v":
    return square(wave(xx))
  if name == "stripes_d":
    return square(wave((xx + yy) / np.sqrt(2)))
  if name == "stripes_a":
    return square(wave((xx - yy) / np.sqrt(2)))
  if name == "checker":
    return square(wave(xx) * wave(yy))
  if name == "dark_checker":
    return -square(wave(xx) * wave(yy))
  if name == "dots":
    return ((0.5 + 0.5 * wave(xx)) * (0.5 + 0.5 * wave(yy)) > 0.6).astype(
        np.float32)
  if name == "cross":
    return np.zeros_like(d)  # filled in by the caller, which knows the centre
  if name == "haze":
    return np.exp(-d ** 2)
  if name == "dark":
    return -np.ones_like(d)
  raise ValueError(f"unknown texture {name!r}")


def _plant(img, rng, pattern: Pattern) -> tuple[float, float, float, float]:
  """Adds one finding at a random place in a lung; returns its box (x, y, w,
  h) in pixels."""
  size = img.shape[0]
  lung = LUNGS[int(rng.integers(2))]
  angle, radial = rng.uniform(0, 2 * np.pi), 0.75 * np.sqrt(rng.uniform())
  cx = (lung[0] + radial * LUNG_AXES[0] * np.cos(angle)) * size
  cy = (lung[1] + radial * LUNG_AXES[1] * np.sin(angle)) * size
  r = pattern.radius * size * rng.uniform(0.85, 1.15)
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
  d = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) / r
  # A soft-edged disc that ends at radius r: the box is its exact extent.
  inside = np.clip((1.0 - d) * 4.0, 0, 1) ** 0.5
  texture = _texture(pattern.texture, d, xx, yy, max(r / 2.5, 2.0))
  if pattern.texture == "cross":
    texture = ((np.abs(xx - cx) < 0.25 * r) |
               (np.abs(yy - cy) < 0.25 * r)).astype(np.float32)
  img += pattern.amplitude * rng.uniform(0.8, 1.2) * inside * texture
  x0, y0 = max(cx - r, 0.0), max(cy - r, 0.0)
  x1, y1 = min(cx + r, size - 1.0), min(cy + r, size - 1.0)
  return x0, y0, x1 - x0, y1 - y0


def render(seed: int, label_vector: np.ndarray, size: int
           ) -> tuple[np.ndarray, list[tuple[int, tuple]]]:
  """One film (uint8) with the findings of `label_vector`, and their boxes.

  The film, the noise and each finding draw from their own generators, so a
  finding changes only its own region: the same seed without it gives the
  same film.
  """
  img = _film(np.random.default_rng([seed, 0]), size)
  boxes = [(int(c), _plant(img, np.random.default_rng([seed, 2 + int(c)]),
                           PATTERNS[c]))
           for c in np.flatnonzero(label_vector)]
  rng = np.random.default_rng([seed, 1])
  img = img * rng.uniform(0.85, 1.15) + rng.normal(0, 0.04)
  img += rng.normal(0, 0.035, img.shape).astype(np.float32)
  return (np.clip(img, 0, 1) * 255).round().astype(np.uint8), boxes


def _write_png(job) -> list[tuple[int, tuple]]:
  path, seed, vector, size, rgba = job
  pixels, boxes = render(seed, vector, size)
  im = Image.fromarray(pixels, "L")
  if rgba:
    im = Image.merge("RGBA", (im, im, im, Image.new("L", im.size, 255)))
  im.save(path, format="PNG", compress_level=1)
  return boxes


def synthesize(out: str, num_images: int = 2000, image_size: int = 256,
               seed: int = 0, rgba_fraction: float = 0.01,
               test_fraction: float = 0.2, min_prevalence: float = 0.015,
               workers: int | None = None) -> dict:
  """Writes the synthetic dataset to `out`; returns a summary."""
  if num_images < 1:
    raise ValueError(f"a synthetic dataset needs at least one image "
                     f"(--num_images), got {num_images}")
  rng = np.random.default_rng(seed)
  images_dir = os.path.join(out, "images")
  os.makedirs(images_dir, exist_ok=True)
  p = prevalences(min_prevalence)
  vectors = (rng.random((num_images, L.NUM_DISEASES)) < p).astype(np.uint8)
  # Patients with 1-6 follow-ups, like the real 3.6 images per patient.
  names, patient_of = [], []
  pid = 0
  while len(names) < num_images:
    pid += 1
    for fu in range(min(int(rng.integers(1, 7)), num_images - len(names))):
      names.append(f"{pid:08d}_{fu:03d}.png")
      patient_of.append(pid)
  patient_of = np.array(patient_of)
  patients = np.unique(patient_of)
  test_patients = set(rng.choice(patients, int(round(test_fraction *
                                                     len(patients))),
                                 replace=False).tolist())
  is_test = np.array([q in test_patients for q in patient_of])
  rgba = rng.random(num_images) < rgba_fraction
  seeds = rng.integers(0, 2**31, num_images)
  jobs = [(os.path.join(images_dir, n), int(s), v, image_size, bool(a))
          for n, s, v, a in zip(names, seeds, vectors, rgba)]
  progress = functools.partial(tqdm.tqdm, total=len(jobs), desc="synth",
                               unit="img", dynamic_ncols=True)
  workers = workers or os.cpu_count() or 1
  if workers == 1:
    # In this process: a spawned pool re-runs the caller's main module,
    # which a script without a __main__ guard (or stdin) cannot survive.
    all_boxes = list(progress(map(_write_png, jobs)))
  else:
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
      all_boxes = list(progress(pool.imap(_write_png, jobs, chunksize=16)))

  ages = rng.integers(1, 95, len(patients))
  sexes = rng.choice(["M", "F"], len(patients))
  with open(os.path.join(out, "Data_Entry_2017.csv"), "w", newline="") as f:
    w = csv.writer(f, lineterminator="\n")
    w.writerow(["Image Index", "Finding Labels", "Follow-up #", "Patient ID",
                "Patient Age", "Patient Gender", "View Position",
                "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x",
                "y]", ""])
    for n, v, q in zip(names, vectors, patient_of):
      findings = "|".join(L.csv_spelling(L.DISEASES[c])
                          for c in np.flatnonzero(v)) or L.NO_FINDING
      k = int(np.searchsorted(patients, q))
      w.writerow([n, findings, int(n[9:12]), int(q), f"{ages[k]:03d}Y",
                  sexes[k], "PA" if rng.random() < 0.6 else "AP",
                  int(rng.integers(2000, 3000)), int(rng.integers(2000, 3000)),
                  0.143, 0.143, ""])
  num_boxes = 0
  with open(os.path.join(out, "BBox_List_2017.csv"), "w", newline="") as f:
    w = csv.writer(f, lineterminator="\n")
    # The real header, "Image Index,Finding Label,Bbox [x,y,w,h],,,"
    f.write("Image Index,Finding Label,Bbox [x,y,w,h],,,\n")
    for n, test, boxes in zip(names, is_test, all_boxes):
      for c, (x, y, bw, bh) in boxes:
        if test and L.DISEASES[c] in BOXED:
          label = "Infiltrate" if L.DISEASES[c] == "Infiltration" else (
              L.csv_spelling(L.DISEASES[c]))
          w.writerow([n, label, f"{x:.4f}", f"{y:.4f}", f"{bw:.4f}",
                      f"{bh:.4f}"])
          num_boxes += 1
  for fname, subset in (("train_val_list.txt", ~is_test),
                        ("test_list.txt", is_test)):
    with open(os.path.join(out, fname), "w", newline="\n") as f:
      f.write("".join(n + "\n" for n, s in zip(names, subset) if s))
  return {"images": num_images, "patients": int(len(patients)),
          "boxes": num_boxes, "rgba": int(rgba.sum()),
          "no_finding": int((vectors.sum(1) == 0).sum()),
          "positives": dict(zip(L.DISEASES, vectors.sum(0).tolist()))}
