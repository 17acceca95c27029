"""Inference images/s of every backbone against its Keras counterpart.

For each model with a Keras application (`cxr_jax.parity.KERAS_REFERENCES`),
both run through XLA on the same machine in one process, at the same size and
batch, float32, inference mode, with the same (random) weights converted
through our Keras converter. Keras is measured two ways: `predict_on_batch`
(what Keras users call) and its jitted `stateless_call` (the fairest
XLA-to-XLA comparison, no Keras overhead). The three are timed in turn within
each repetition, so drift on a shared machine hits every side alike; we
report medians.

    python benchmarks/forward.py [--models resnet50 ...] [--batch 8]
        [--size 224] [--reps 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

from cxr_jax import models, parity, weights  # noqa: E402
from cxr_jax.parity import keras as keras_parity  # noqa: E402


def time_interleaved(fns: dict, reps: int) -> dict:
  """Median seconds per call of each fn, timed in turn within each
  repetition."""
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


def measure(name: str, batch: int, size: int, reps: int) -> dict:
  ref = parity.KERAS_REFERENCES[name]
  x = np.random.default_rng(0).uniform(
      -1, 1, (batch, size, size, 3)).astype(np.float32)
  kmodel = keras_parity.build_keras_reference(ref, size)
  with tempfile.TemporaryDirectory() as tmp:
    path = keras_parity.save_keras_weights(kmodel, tmp, name)["keras3"]
    out = os.path.join(tmp, "w.npz")
    weights.convert(name, "keras", path, out)
    variables = jax.device_put(weights.load_pretrained(out))
    facts = weights.architecture(out)[1]
  model = models.build(name, num_classes=kmodel.output_shape[-1], **facts)
  module = getattr(keras.applications, ref.preprocess_module)
  pixels = module.preprocess_input((x + 1.0) * 127.5)
  xd, kd = jax.device_put(x), jax.device_put(pixels)
  flax_fn = jax.jit(lambda v, x: model.apply(v, x, train=False))
  # Copies: predict_on_batch swaps the variables' buffers under our feet.
  trainable = [jax.device_put(np.asarray(v.value))
               for v in kmodel.trainable_variables]
  non_trainable = [jax.device_put(np.asarray(v.value))
                   for v in kmodel.non_trainable_variables]
  stateless = jax.jit(lambda t, n, x: kmodel.stateless_call(
      t, n, x, training=False)[0])
  t = time_interleaved({
      "flax": lambda: flax_fn(variables, xd).block_until_ready(),
      "predict": lambda: kmodel.predict_on_batch(pixels),
      "stateless": lambda: stateless(trainable, non_trainable,
                                     kd).block_until_ready(),
  }, reps)
  return {"model": name, "batch": batch, "size": size,
          "flax_images_per_s": batch / t["flax"],
          "keras_predict_on_batch_images_per_s": batch / t["predict"],
          "keras_jit_stateless_images_per_s": batch / t["stateless"],
          "ratio_vs_predict_on_batch": t["predict"] / t["flax"],
          "ratio_vs_jit_stateless": t["stateless"] / t["flax"]}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--models", nargs="+",
                      default=sorted(parity.KERAS_REFERENCES))
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--size", type=int, default=224)
  parser.add_argument("--reps", type=int, default=10)
  parser.add_argument("--json", help="also write the results here")
  args = parser.parse_args()
  header = {"device": str(jax.devices()[0].device_kind),
            "platform": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "jax": jax.__version__,
            "keras": keras.__version__}
  print(f"inference, batch {args.batch} at {args.size}px, {header['device']} "
        f"({header['cpus']} cores), jax {jax.__version__}, keras "
        f"{keras.__version__}")
  print(f"{'model':22s} {'flax img/s':>10s} {'keras pred':>10s} "
        f"{'keras jit':>10s} {'vs pred':>8s} {'vs jit':>8s}")
  results = []
  for name in args.models:
    r = measure(name, args.batch, args.size, args.reps)
    results.append(r)
    print(f"{name:22s} {r['flax_images_per_s']:10.2f} "
          f"{r['keras_predict_on_batch_images_per_s']:10.2f} "
          f"{r['keras_jit_stateless_images_per_s']:10.2f} "
          f"{r['ratio_vs_predict_on_batch']:8.3f} "
          f"{r['ratio_vs_jit_stateless']:8.3f}", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({**header, "results": results}, f, indent=2)


if __name__ == "__main__":
  main()
