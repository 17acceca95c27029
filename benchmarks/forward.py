"""Inference images/s: our Flax InceptionV3 against Keras' on the JAX backend.

Both run through XLA on the same machine in one process, at 299x299 and batch
8, float32, inference mode. Keras is measured two ways: `predict_on_batch`
(what Keras users call) and its jitted `stateless_call` (the fairest
XLA-to-XLA comparison, no Keras overhead). Each side is warmed up (compiled)
first; we report the median of several timed repetitions.

    python benchmarks/forward.py [--batch 8] [--size 299] [--reps 10]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax
import numpy as np


def _time_interleaved(fns: dict, reps: int) -> dict:
  """Median seconds per call of each fn, timed in turn within each repetition
  so that drift on a shared machine hits every side alike."""
  for fn in fns.values():  # compile and warm up
    fn()
    fn()
  times = {name: [] for name in fns}
  for _ in range(reps):
    for name, fn in fns.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--size", type=int, default=299)
  parser.add_argument("--reps", type=int, default=10)
  parser.add_argument("--json", help="also write the results here")
  args = parser.parse_args()

  import keras
  from cxr_jax import parity, weights
  import tempfile

  x = np.random.default_rng(0).uniform(
      -1, 1, (args.batch, args.size, args.size, 3)).astype(np.float32)
  kmodel = parity.build_keras_reference(args.size)
  with tempfile.TemporaryDirectory() as tmp:
    path = parity.save_keras_weights(kmodel, tmp)["keras3"]
    variables, _ = weights.convert_keras(path)

  from cxr_jax.models import InceptionV3
  model = InceptionV3(num_classes=1000)
  variables = jax.device_put(variables)
  xd = jax.device_put(x)
  flax_fn = jax.jit(lambda v, x: model.apply(v, x, train=False))
  # Copies: predict_on_batch swaps the variables' buffers under our feet.
  trainable = [jax.device_put(np.asarray(v.value))
               for v in kmodel.trainable_variables]
  non_trainable = [jax.device_put(np.asarray(v.value))
                   for v in kmodel.non_trainable_variables]
  stateless = jax.jit(lambda t, n, x: kmodel.stateless_call(
      t, n, x, training=False)[0])
  t = _time_interleaved({
      "flax": lambda: flax_fn(variables, xd).block_until_ready(),
      "predict": lambda: kmodel.predict_on_batch(x),
      "stateless": lambda: stateless(trainable, non_trainable,
                                     xd).block_until_ready(),
  }, args.reps)
  t_flax, t_predict, t_stateless = t["flax"], t["predict"], t["stateless"]

  ips = lambda t: args.batch / t
  results = {
      "device": str(jax.devices()[0].device_kind),
      "platform": platform.processor() or platform.machine(),
      "cpus": os.cpu_count(), "jax": jax.__version__,
      "keras": keras.__version__, "batch": args.batch, "size": args.size,
      "flax_images_per_s": ips(t_flax),
      "keras_predict_on_batch_images_per_s": ips(t_predict),
      "keras_jit_stateless_images_per_s": ips(t_stateless),
      "ratio_vs_predict_on_batch": t_predict / t_flax,
      "ratio_vs_jit_stateless": t_stateless / t_flax,
  }
  print(f"InceptionV3 inference, batch {args.batch} at {args.size}px, "
        f"{results['device']} ({results['cpus']} cores), jax {jax.__version__}")
  print(f"  cxr_jax (flax, jit)          {ips(t_flax):8.2f} images/s")
  print(f"  keras predict_on_batch       {ips(t_predict):8.2f} images/s")
  print(f"  keras stateless_call (jit)   {ips(t_stateless):8.2f} images/s")
  print(f"  ratio flax / keras predict   {results['ratio_vs_predict_on_batch']:.3f}")
  print(f"  ratio flax / keras jit       {results['ratio_vs_jit_stateless']:.3f}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()
