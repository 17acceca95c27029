"""Device AUC against sklearn's per-class loop, on the official test set's size.

25,596 images x 14 classes (the NIH test list), scores with ties. The jitted
AUC is compiled first; both sides are timed in turn over several repetitions
and the median is reported, with the ratio, from one run on one machine.
It also reports the wall time of the loss functions on a batch of 16.

    python benchmarks/losses.py [--reps 7]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import numpy as np
from sklearn.metrics import roc_auc_score

from cxr_jax import losses, metrics


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--images", type=int, default=25_596)
  parser.add_argument("--reps", type=int, default=7)
  parser.add_argument("--json")
  args = parser.parse_args()

  rng = np.random.default_rng(0)
  y = (rng.random((args.images, 14)) < 0.1).astype(np.float32)
  s = np.round(rng.normal(size=y.shape) + y, 2).astype(np.float32)
  yd, sd = jax.device_put(y), jax.device_put(s)

  def sk():
    return [roc_auc_score(y[:, c], s[:, c]) for c in range(14)]

  def dev():
    return metrics.device_auc(yd, sd).block_until_ready()

  dev()  # compile
  times = {"device": [], "sklearn": []}
  for _ in range(args.reps):
    for name, fn in (("device", dev), ("sklearn", sk)):
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)
  t_dev = statistics.median(times["device"])
  t_sk = statistics.median(times["sklearn"])
  err = float(np.abs(np.asarray(dev()) - np.array(sk())).max())

  z = jax.device_put(rng.normal(size=(16, 15)).astype(np.float32))
  lab = jax.device_put((rng.random((16, 15)) < 0.1).astype(np.float32))
  loss_times = {}
  for name, fn in losses.LOSSES.items():
    step = jax.jit(jax.value_and_grad(fn))
    step(z, lab)[0].block_until_ready()
    t0 = time.perf_counter()
    for _ in range(100):
      step(z, lab)[0].block_until_ready()
    loss_times[name] = (time.perf_counter() - t0) / 100 * 1e6

  result = {"device": jax.devices()[0].device_kind, "cpus": os.cpu_count(),
            "jax": jax.__version__, "images": args.images, "classes": 14,
            "device_auc_ms": t_dev * 1e3, "sklearn_loop_ms": t_sk * 1e3,
            "speedup": t_sk / t_dev, "max_abs_diff": err,
            "loss_value_and_grad_us": loss_times}
  print(f"AUC of {args.images} x 14 on {result['device']} "
        f"({result['cpus']} cores), jax {jax.__version__}:")
  print(f"  jitted device AUC   {t_dev * 1e3:8.2f} ms")
  print(f"  sklearn loop        {t_sk * 1e3:8.2f} ms")
  print(f"  speedup             {t_sk / t_dev:8.2f}x   (max |diff| {err:.1e})")
  print("loss value+grad on a [16, 15] batch (us):")
  for name, us in loss_times.items():
    print(f"  {name:22s} {us:7.1f}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()
