"""Does evaluation run at the forward pass's speed? Images/s of the real
evaluation path against the bare forward pass, per batch size, in one
process.

* bare forward: the jitted analysis forward (`inference.Inference`) called
  again and again on one batch already on the devices;
* evaluation: `inference.predict_batches` over a prepared dataset read by
  the real input pipeline (`pipeline.eval_batches`), as `evaluate` and
  validation run it: placement, the forward pass and reading the rows back;
* the same over those batches decoded beforehand ("from memory"): the
  evaluation path's own cost without the loader's decoding.

Each side's best batch size is reported, and their ratio (goal >= 0.95).
The default 2,048 images divide by every default batch size: 800 images in
batches of 128 used to run 896, so the padding of one last batch took 11%
off that row, where a real validation set (about 11,000 films) pays under
1%.
The model and size are small by default (InceptionV3 at depth multiplier
0.125, 75 px) so that a CPU forward pass is short, like an accelerator's.

    python benchmarks/evaluate.py [--batch_sizes 16 32 64 128] [--images 2048]
        [--model inception_v3] [--image_size 75] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def bare_forward(forward, variables, batch: dict, reps: int) -> float:
  """Images/s of the forward pass alone on a placed batch."""
  from cxr_jax import parallel
  placed = parallel.global_batch(batch, forward.mesh)
  jax.block_until_ready(forward._forward(variables, placed))
  start = time.perf_counter()
  for _ in range(reps):
    out = forward._forward(variables, placed)
  jax.block_until_ready(out)
  return reps * len(batch["image"]) / (time.perf_counter() - start)


def evaluation(forward, variables, dataset, names, batch_size: int,
               threads: int) -> tuple[float, float]:
  """Images/s of predict_batches over `names` (after one pass that
  compiles): through the input pipeline, and over the same batches decoded
  beforehand and held in memory. The second leaves out the loader, which on
  a CPU decodes on the cores that run the forward pass."""
  from cxr_jax import inference
  from cxr_jax.data import pipeline
  read = lambda: pipeline.eval_batches(dataset, names, batch_size,
                                       threads=threads)
  in_memory = list(read())

  def rate(batches) -> float:
    start = time.perf_counter()
    out = inference.predict_batches(forward, variables, batches())
    seconds = time.perf_counter() - start
    assert len(out["probs"]) == len(names)
    return len(names) / seconds

  rate(lambda: iter(in_memory))
  return rate(read), rate(lambda: iter(in_memory))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch_sizes", type=int, nargs="+",
                      default=[16, 32, 64, 128])
  parser.add_argument("--images", type=int, default=2048)
  parser.add_argument("--model", default="inception_v3")
  parser.add_argument("--image_size", type=int, default=75)
  parser.add_argument("--depth_multiplier", type=float, default=0.125)
  parser.add_argument("--loader_threads", type=int, default=2)
  parser.add_argument("--reps", type=int, default=10)
  parser.add_argument("--json")
  args = parser.parse_args()

  from loop import prepared_dataset

  from cxr_jax import inference, models
  from cxr_jax.config import load_config
  from cxr_jax.data import pipeline
  overrides = [f"model_name={args.model}", f"image_size={args.image_size}",
               "transfer=false"]
  if args.model == "inception_v3":
    overrides.append(f"model.depth_multiplier={args.depth_multiplier}")
  config = load_config(str(ROOT / "configs" / "default.py"), overrides)
  model = models.from_config(config)
  x = np.zeros((1, args.image_size, args.image_size, 3), np.float32)
  variables = jax.jit(model.init)(jax.random.key(0), x)
  forward = inference.Inference(model)
  variables = forward.put(variables)
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    data = prepared_dataset(pathlib.Path(tmp), args.image_size,
                            num_images=args.images)
    dataset = pipeline.PreparedDataset(data, args.image_size)
    names = dataset.names
    for batch_size in args.batch_sizes:
      first = next(pipeline.eval_batches(dataset, names, batch_size))
      bare = bare_forward(forward, variables, first, args.reps)
      evaluated, from_memory = evaluation(forward, variables, dataset, names,
                                          batch_size, args.loader_threads)
      rows.append({"batch_size": batch_size, "bare_images_per_s": bare,
                   "evaluation_images_per_s": evaluated,
                   "ratio": evaluated / bare,
                   "from_memory_images_per_s": from_memory,
                   "from_memory_ratio": from_memory / bare})
  best_bare = max(r["bare_images_per_s"] for r in rows)
  best_eval = max(r["evaluation_images_per_s"] for r in rows)
  best_memory = max(r["from_memory_images_per_s"] for r in rows)
  device = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
  print(f"evaluation vs bare forward: {args.model} at {args.image_size}px, "
        f"{len(names)} images, {device}, jax {jax.__version__}, "
        f"{os.cpu_count()} host cores")
  print(f"{'batch':>5s} {'bare img/s':>11s} {'evaluate img/s':>15s} "
        f"{'ratio':>6s} {'from memory':>12s} {'ratio':>6s}")
  for r in rows:
    print(f"{r['batch_size']:5d} {r['bare_images_per_s']:11.1f} "
          f"{r['evaluation_images_per_s']:15.1f} {r['ratio']:6.3f} "
          f"{r['from_memory_images_per_s']:12.1f} "
          f"{r['from_memory_ratio']:6.3f}")
  print(f"best evaluation / best bare forward: {best_eval / best_bare:.3f}; "
        f"from memory: {best_memory / best_bare:.3f}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"device": device, "jax": jax.__version__,
                 "args": vars(args), "rows": rows,
                 "ratio_of_bests": best_eval / best_bare,
                 "from_memory_ratio_of_bests": best_memory / best_bare},
                f, indent=2)


if __name__ == "__main__":
  main()
