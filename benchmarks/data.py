"""Data throughput: `prepare` against a plain PIL loop, and the input pipeline.

1. prepare: decode + gray + antialiased resize of 1024x1024 NIH PNGs to 299,
   written as ArrayRecord by TFDS with all cores, against the plain
   single-process loop `Image.open(p).convert("L").resize((299, 299))`.
   Real NIH PNGs are used when ../shared is present (the 40 sample images,
   each listed `--copies` times under new names), else synthetic 1024^2 films.
2. pipeline: from the prepared dataset to global batches of 16 at 299x299
   that are ready for the model: uint8 batches from Grain, moved to the
   device and scaled/3-channelled there (our default), or normalised on the
   host first (measured for comparison); and the loader alone with worker
   processes (`--workers`, config.loader_workers) beside its threads.

    python benchmarks/data.py [--copies 4] [--batches 150] [--workers 2 4]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import tempfile
import time

import numpy as np
from PIL import Image

SAMPLE = (pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" /
          "chestxray14_sample")


def to_model_input_host(images: np.ndarray) -> np.ndarray:
  """`pipeline.to_model_input` on the host, the placement it is measured
  against."""
  x = images.astype(np.float32) * (2.0 / 255.0) - 1.0
  return np.repeat(x, 3, axis=-1)


def make_nih_folder(root: pathlib.Path, copies: int) -> list[pathlib.Path]:
  """An NIH-layout folder of 1024^2 PNGs and a CSV listing them."""
  images = root / "images"
  images.mkdir(parents=True)
  if (SAMPLE / "images").is_dir():
    sources = sorted((SAMPLE / "images").glob("*.png"))
  else:
    from cxr_jax.data import synthetic
    sources = []
    for i in range(40):
      pixels, _ = synthetic.render(i, np.zeros(14, np.uint8), 1024)
      path = root / f"src_{i}.png"
      Image.fromarray(pixels).save(path)
      sources.append(path)
  rows = ["Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,"
          "Patient Gender,View Position,OriginalImage[Width,Height],"
          "OriginalImagePixelSpacing[x,y]"]
  paths = []
  for c in range(copies):
    for i, src in enumerate(sources):
      name = f"{c * 1000 + i + 1:08d}_000.png"
      shutil.copy(src, images / name)
      paths.append(images / name)
      rows.append(f"{name},No Finding,0,{c * 1000 + i + 1},50,M,PA,1024,1024,"
                  f"0.14,0.14")
  (root / "Data_Entry_2017_v2020.csv").write_text("\n".join(rows) + "\n")
  return paths


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--copies", type=int, default=4)
  parser.add_argument("--size", type=int, default=299)
  parser.add_argument("--batches", type=int, default=150)
  parser.add_argument("--threads", type=int, default=4,
                      help="the loader's threads (config.loader_threads)")
  parser.add_argument("--workers", type=int, nargs="*", default=[],
                      help="worker process counts to time the loader with "
                           "(config.loader_workers)")
  parser.add_argument("--json")
  args = parser.parse_args()
  cores = os.cpu_count()

  import jax
  from cxr_jax.data import pipeline, tfds_builder

  tmp = pathlib.Path(tempfile.mkdtemp())
  try:
    paths = make_nih_folder(tmp / "nih", args.copies)
    n = len(paths)
    for p in paths[:4]:  # warm the page cache for both sides
      p.read_bytes()
    t0 = time.perf_counter()
    for p in paths:
      np.asarray(Image.open(p).convert("L").resize((args.size, args.size)))
    t_plain = time.perf_counter() - t0

    t0 = time.perf_counter()
    tfds_builder.prepare(str(tmp / "nih"), str(tmp / "prepared"), args.size)
    t_prepare = time.perf_counter() - t0

    ds = pipeline.PreparedDataset(str(tmp / "prepared"))
    names = ds.names
    it = iter(pipeline.train_dataset(ds, names, 16, seed=0, process_index=0,
                                     process_count=1, threads=args.threads))
    to_input = jax.jit(pipeline.to_model_input)
    for _ in range(5):  # warm up threads and compile
      b = next(it)
      to_input(jax.device_put(b["image"])).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(args.batches):
      b = next(it)
      x = to_input(jax.device_put(b["image"]))
      labels = jax.device_put(b["labels"])
    x.block_until_ready()
    labels.block_until_ready()
    t_device = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.batches):
      b = next(it)
      x = jax.device_put(to_model_input_host(b["image"]))
      labels = jax.device_put(b["labels"])
    x.block_until_ready()
    t_host = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(args.batches):
      next(it)
    t_loader = time.perf_counter() - t0
    # CPU time, all threads: what an accelerator host spends per image,
    # steadier than a rate on a shared machine. Without threads as well,
    # which leaves out their hand-offs.
    c_loader = time.process_time() - c0
    alone = iter(pipeline.train_dataset(ds, names, 16, seed=0,
                                        process_index=0, process_count=1,
                                        threads=0))
    next(alone)
    c0 = time.process_time()
    for _ in range(args.batches):
      next(alone)
    c_no_threads = time.process_time() - c0
    t_workers = {}
    for workers in args.workers:
      pooled = iter(pipeline.train_dataset(
          ds, names, 16, seed=0, process_index=0, process_count=1,
          threads=args.threads, workers=workers))
      try:
        for _ in range(5):  # the workers start and fill their buffers
          next(pooled)
        t0 = time.perf_counter()
        for _ in range(args.batches):
          next(pooled)
        t_workers[workers] = time.perf_counter() - t0
      finally:
        pooled.close()
  finally:
    shutil.rmtree(tmp, ignore_errors=True)

  images = args.batches * 16
  result = {
      "cores": cores, "loader_threads": args.threads, "images": n,
      "size": args.size,
      "source": "real NIH PNGs" if (SAMPLE / "images").is_dir() else
                "synthetic 1024^2 PNGs",
      "plain_pil_images_per_s": n / t_plain,
      "prepare_images_per_s": n / t_prepare,
      "prepare_images_per_s_per_core": n / t_prepare / cores,
      "prepare_speedup": t_plain / t_prepare,
      "pipeline_device_normalize_images_per_s": images / t_device,
      "pipeline_host_normalize_images_per_s": images / t_host,
      "loader_only_images_per_s": images / t_loader,
      "loader_cpu_us_per_image": c_loader / images * 1e6,
      "loader_cpu_us_per_image_no_threads": c_no_threads / images * 1e6,
      **{f"loader_{w}_workers_images_per_s": images / t
         for w, t in t_workers.items()},
  }
  print(f"data on {cores} cores, {n} {result['source']} -> {args.size}px")
  print(f"  plain PIL loop (1 process)   {result['plain_pil_images_per_s']:8.1f} images/s")
  print(f"  prepare (TFDS, all cores)    {result['prepare_images_per_s']:8.1f} images/s "
        f"({result['prepare_images_per_s_per_core']:.1f} per core)")
  print(f"  prepare speedup              {result['prepare_speedup']:8.2f}x")
  print(f"  pipeline, normalize on device {result['pipeline_device_normalize_images_per_s']:7.1f} images/s")
  print(f"  pipeline, normalize on host   {result['pipeline_host_normalize_images_per_s']:7.1f} images/s")
  print(f"  loader alone (uint8 batches)  {result['loader_only_images_per_s']:7.1f} images/s")
  print(f"  loader CPU per image          {result['loader_cpu_us_per_image']:7.1f} us "
        f"({args.threads} threads), "
        f"{result['loader_cpu_us_per_image_no_threads']:.1f} us (none)")
  for w, t in t_workers.items():
    print(f"  loader, {w:2d} worker processes  {images / t:7.1f} images/s")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()
