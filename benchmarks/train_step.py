"""Training throughput of the real step: images/s and compile time.

A backbone (InceptionV3 by default) with the 15-output head, CW-CEL with the
auxiliary task, Adadelta, synchronised BatchNorm, on every device present (shard_map over a 'data'
mesh), for global batch sizes 16 and 64, float32 and bfloat16, at 299x299.
Data are random uint8 batches already on the host, so this measures the step
(transfer of uint8 pixels included), not the loader. Prints a table and
writes JSON.

    python benchmarks/train_step.py [--model resnet50] [--steps 20]
        [--sizes 16 64] [--blocks scanned unrolled] [--json out.json]

`--blocks scanned unrolled` times a family that scans its repeated blocks
(`models.scans_blocks`) both ways in the same run: compile time and step
speed of the scan against every block traced (`unroll_blocks`).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def write_json(path: str, model: str, results: list) -> None:
  device = (f"{jax.device_count()} x {jax.devices()[0].device_kind}"
            f" ({jax.devices()[0].platform})")
  with open(path, "w") as f:
    json.dump({"device": device, "jax": jax.__version__, "model": model,
               "results": results}, f, indent=2)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--sizes", type=int, nargs="+", default=[16, 64])
  parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
  parser.add_argument("--image_size", type=int, default=299)
  parser.add_argument("--model", default="inception_v3")
  parser.add_argument("--blocks", nargs="+", default=["scanned"],
                      choices=["scanned", "unrolled"])
  parser.add_argument("--json")
  args = parser.parse_args()

  from cxr_jax import models, train
  from cxr_jax.config import load_config

  if args.blocks != ["scanned"] and not models.scans_blocks(args.model):
    parser.error(f"--blocks: {args.model} does not scan its blocks")
  root = pathlib.Path(__file__).resolve().parents[1]
  results = []
  rng = np.random.default_rng(0)
  rows = [(d, b, blocks) for d in args.dtypes for b in args.sizes
          for blocks in args.blocks]
  for dtype, batch, blocks in rows:
    unrolled = [] if blocks == "scanned" else ["model.unroll_blocks=true"]
    c = load_config(str(root / "configs" / "default.py"),
                    [f"batch_size={batch}", f"model.dtype={dtype}",
                     f"model_name={args.model}",
                     f"image_size={args.image_size}", "transfer=false",
                     *unrolled])
    trainer = train.Trainer(c)
    state = trainer.init_state(jax.random.key(0))
    data = {"image": rng.integers(0, 256, (batch, args.image_size,
                                           args.image_size, 1),
                                  dtype=np.uint8),
            "labels": (rng.random((batch, 15)) < 0.1).astype(np.float32),
            "mask": np.ones(batch, np.float32)}
    t0 = time.perf_counter()
    state, m = trainer.train(state, data)
    jax.block_until_ready(m["loss"])
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.steps):
      state, m = trainer.train(state, data)
    jax.block_until_ready(m["loss"])
    step_s = (time.perf_counter() - t0) / args.steps
    results.append({"dtype": dtype, "global_batch": batch,
                    "blocks": blocks,
                    "per_device_batch": batch // trainer.num_devices,
                    "images_per_s": batch / step_s,
                    "step_ms": step_s * 1e3,
                    "first_step_incl_compile_s": compile_s})
    print(results[-1], flush=True)
    if args.json:  # after every row: a run cut short keeps what it did
      write_json(args.json, args.model, results)
  device = (f"{jax.device_count()} x {jax.devices()[0].device_kind}"
            f" ({jax.devices()[0].platform})")
  print(f"train step, {args.model} at {args.image_size}px on {device}, "
        f"jax {jax.__version__}, {os.cpu_count()} host cores")
  print(f"{'dtype':9s} {'batch':>5s} {'blocks':>8s} {'images/s':>9s} "
        f"{'step ms':>9s} {'compile s':>9s}")
  for r in results:
    print(f"{r['dtype']:9s} {r['global_batch']:5d} {r['blocks']:>8s} "
          f"{r['images_per_s']:9.2f} {r['step_ms']:9.1f} "
          f"{r['first_step_incl_compile_s']:9.1f}")


if __name__ == "__main__":
  main()
