"""GFLOP and MB per image of the train and eval steps, beside the Keras peer.

XLA's cost analysis of each compiled step (`lower(...).compile()
.cost_analysis()`: 'flops' and 'bytes accessed'), divided by the batch. The
steps are lowered on abstract shapes and compiled, never run, so a 299 px
batch of 64 costs compile time only, on any machine. The figures are the
compiling backend's: XLA's fusion decisions, and so the bytes, differ
between CPU and GPU.

Per backbone (`cxr_jax.models.MODELS`) and compute dtype:

* ours, train: `Trainer._train` exactly as the training loop runs it
  (shard_map over a one-device mesh, synchronised BatchNorm, the config's
  loss with the auxiliary task, Adadelta, the non-finite guard), from scratch
  (`transfer=false`). Input uint8 [B, S, S, 1] plus labels and mask.
* ours, eval: the analysis forward, `cxr_jax.inference.Inference` with
  probabilities only (as `evaluate` builds it), float32 variables, input
  uint8 [B, S, S, 1].
* Keras peer (families with a `keras.applications` model,
  `cxr_jax.parity.KERAS_REFERENCES`): the application with
  `include_top=False, pooling='avg'` and a 15-unit Dense head, random weights.
  Train: jitted `stateless_call(training=True)`, sigmoid cross-entropy,
  `jax.grad`, the same optax Adadelta as ours, and the new non-trainable
  variables. Eval: jitted `stateless_call(training=False)`. bfloat16 is
  Keras' 'mixed_bfloat16' policy. Its input is float32 [B, S, S, 3], already
  preprocessed: ours takes uint8 one-channel pixels and converts them on the
  device, so ours reads fewer input bytes.

The "H100 bound" is the images/s that 3.35 TB/s of HBM allows for the step's
bytes per image: a ceiling, not a prediction.

    python benchmarks/step_cost.py [--models inception_v3 ...] [--batch 64]
        [--size 299] [--dtypes bfloat16 float32] [--no_keras]
        [--json out.json]
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

H100_BYTES_PER_S = 3.35e12
NUM_OUTPUTS = 15


def cost(lowered) -> dict[str, float]:
  """Compiles `lowered` and returns its flops, bytes and compile seconds."""
  start = time.perf_counter()
  compiled = lowered.compile()
  seconds = time.perf_counter() - start
  analysis = compiled.cost_analysis()
  # jax returns a dict on recent versions, a list of one dict per program
  # on some older ones.
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  analysis = analysis or {}
  return {"flops": float(analysis.get("flops", float("nan"))),
          "bytes": float(analysis.get("bytes accessed", float("nan"))),
          "compile_s": seconds}


def abstract(tree, sharding=None):
  """ShapeDtypeStructs of a tree of arrays or shapes (so nothing is
  allocated on the device for lowering)."""
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
      tree)


def ours(name: str, dtype: str, batch: int, size: int) -> dict[str, dict]:
  """Cost of our train and eval steps for backbone `name`."""
  from cxr_jax import inference, models, parallel, train
  from cxr_jax.config import load_config

  root = pathlib.Path(__file__).resolve().parents[1]
  c = load_config(str(root / "configs" / "default.py"),
                  [f"batch_size={batch}", f"model.dtype={dtype}",
                   f"model_name={name}", f"image_size={size}",
                   "transfer=false"] + [
                       f"model.{k}={v}" for k, v in
                       models.cost_analysis_options(name).items()])
  trainer = train.Trainer(c, num_devices=1)
  mesh = trainer.backend.mesh
  rows = parallel.batch_sharding(mesh)
  # init_state device_puts real arrays; the step only needs their shapes.
  state = trainer.abstract_state()
  image = jax.ShapeDtypeStruct((batch, size, size, 1), np.uint8,
                               sharding=rows)
  data = {"image": image,
          "labels": jax.ShapeDtypeStruct((batch, NUM_OUTPUTS), np.float32,
                                         sharding=rows),
          "mask": jax.ShapeDtypeStruct((batch,), np.float32, sharding=rows)}
  result = {"train": cost(trainer._train.lower(state, data))}
  # Probabilities only, as `evaluate` runs it: validation's loss and
  # predict's class maps are small extras on the same forward.
  forward = inference.Inference(trainer.eval_model, mesh)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  result["eval"] = cost(forward._forward.lower(variables, {"image": image}))
  return result


def keras_peer(application: str, dtype: str, batch: int, size: int,
               tx) -> dict[str, dict]:
  """Cost of the Keras application's train and eval steps (same optimizer
  `tx` as ours)."""
  os.environ.setdefault("KERAS_BACKEND", "jax")
  import keras
  import optax

  if keras.backend.backend() != "jax":
    raise RuntimeError("the Keras peer needs KERAS_BACKEND=jax")
  keras.backend.clear_session()
  policy = "mixed_bfloat16" if dtype == "bfloat16" else "float32"
  keras.mixed_precision.set_global_policy(policy)
  try:
    base = getattr(keras.applications, application)(
        weights=None, include_top=False, pooling="avg",
        input_shape=(size, size, 3))
    logits = keras.layers.Dense(NUM_OUTPUTS, name="predictions")(base.output)
    net = keras.Model(base.input, logits)
    trainable = abstract([v.value for v in net.trainable_variables])
    fixed = abstract([v.value for v in net.non_trainable_variables])
    opt_state = jax.eval_shape(tx.init, trainable)
    x = jax.ShapeDtypeStruct((batch, size, size, 3), np.float32)
    y = jax.ShapeDtypeStruct((batch, NUM_OUTPUTS), np.float32)

    def objective(params, fixed, x, y):
      out, fixed = net.stateless_call(params, fixed, x, training=True)
      loss = optax.sigmoid_binary_cross_entropy(
          out.astype(np.float32), y).mean()
      return loss, fixed

    def train_step(params, fixed, opt_state, x, y):
      grads, fixed = jax.grad(objective, has_aux=True)(params, fixed, x, y)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), fixed, opt_state

    # Donated like ours, so both steps may update in place.
    step = jax.jit(train_step, donate_argnums=(0, 1, 2))
    predict = jax.jit(lambda params, fixed, x: net.stateless_call(
        params, fixed, x, training=False)[0])
    return {"train": cost(step.lower(trainable, fixed, opt_state, x, y)),
            "eval": cost(predict.lower(trainable, fixed, x))}
  finally:
    keras.mixed_precision.set_global_policy("float32")


def per_image(c: dict | None, batch: int) -> dict | None:
  if c is None:
    return None
  mb = c["bytes"] / batch / 1e6
  return {"gflop_per_image": c["flops"] / batch / 1e9,
          "mb_per_image": mb,
          "h100_bound_images_per_s": H100_BYTES_PER_S / (mb * 1e6),
          "compile_s": c["compile_s"], "flops": c["flops"],
          "bytes_accessed": c["bytes"]}


def fmt(x: float | None, spec: str) -> str:
  return "—" if x is None else format(x, spec)


def main():
  from cxr_jax import models

  parser = argparse.ArgumentParser()
  parser.add_argument("--models", nargs="+", default=list(models.MODELS),
                      choices=sorted(models.MODELS), metavar="MODEL")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--size", type=int, default=299)
  parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"],
                      choices=["bfloat16", "float32"])
  parser.add_argument("--no_keras", action="store_true",
                      help="ours only (no keras needed)")
  parser.add_argument("--json", help="also write the results here")
  args = parser.parse_args()
  if args.batch < 1 or args.size < 1:
    parser.error("--batch and --size must be positive")

  references, tx, keras_version = {}, None, None
  if not args.no_keras:
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import keras
    from cxr_jax import optim, parity
    from cxr_jax.config import load_config
    references = parity.KERAS_REFERENCES
    keras_version = keras.__version__
    root = pathlib.Path(__file__).resolve().parents[1]
    tx = optim.from_config(load_config(str(root / "configs" / "default.py")))

  device = f"{jax.devices()[0].device_kind} ({jax.devices()[0].platform})"
  print(f"step cost, batch {args.batch} at {args.size}px, XLA cost analysis "
        f"on {device}, jax {jax.__version__}, keras "
        f"{keras_version or 'not used'}", flush=True)
  results = []
  for name in args.models:
    for dtype in args.dtypes:
      mine = ours(name, dtype, args.batch, args.size)
      peer = None
      if name in references:
        peer = keras_peer(references[name].application, dtype, args.batch,
                          args.size, tx)
      for step in ("train", "eval"):
        row = {"model": name, "dtype": dtype, "step": step,
               "batch": args.batch, "size": args.size,
               "ours": per_image(mine[step], args.batch),
               "keras": per_image(peer and peer[step], args.batch)}
        results.append(row)
        print(f"  {name} {dtype} {step}: ours compiled in "
              f"{row['ours']['compile_s']:.1f} s"
              + (f", keras in {row['keras']['compile_s']:.1f} s"
                 if row["keras"] else ""), flush=True)

  print()
  print("| model | dtype | step | ours GFLOP/img | ours MB/img | "
        "ours H100 bound img/s | Keras GFLOP/img | Keras MB/img | "
        "Keras H100 bound img/s | bytes ours/Keras | compile s ours / Keras |")
  print("|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|")
  for r in results:
    o, k = r["ours"], r["keras"]
    ratio = o["mb_per_image"] / k["mb_per_image"] if k else None
    print(f"| {r['model']} | {r['dtype']} | {r['step']} "
          f"| {o['gflop_per_image']:.2f} | {o['mb_per_image']:,.0f} "
          f"| {o['h100_bound_images_per_s']:,.0f} "
          f"| {fmt(k and k['gflop_per_image'], '.2f')} "
          f"| {fmt(k and k['mb_per_image'], ',.0f')} "
          f"| {fmt(k and k['h100_bound_images_per_s'], ',.0f')} "
          f"| {fmt(ratio, '.3f')} "
          f"| {o['compile_s']:.1f} / {fmt(k and k['compile_s'], '.1f')} |")
  if references:
    print("\nKeras input: float32 [B, S, S, 3]; ours: uint8 [B, S, S, 1] "
          "converted on the device.")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"device": device, "jax": jax.__version__,
                 "keras": keras_version, "batch": args.batch,
                 "size": args.size, "h100_bytes_per_s": H100_BYTES_PER_S,
                 "results": results}, f, indent=2)


if __name__ == "__main__":
  main()
