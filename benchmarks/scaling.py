"""Weak scaling: the real train step's time at a fixed per-device batch on
1, 2, 4 and 8 devices.

For each device count N a child process builds `cxr_jax.train.Trainer`
(shard_map over a 'data' mesh of N devices, synchronised BatchNorm, CW-CEL
with the auxiliary task, Adadelta) with global batch = per-device batch x N,
compiles its step (`Trainer.compile`), runs warm-up steps, then times each
step on one random uint8 batch already placed on the devices
(`Trainer.step`), so the host-to-device transfer is left out. Reported per
N: median and minimum step time, images/s, the median step time relative to
the smallest N measured, and compile seconds. The first child initialises
the state (`Trainer.init_state`) and the others load its values, which are
the same at every N, rather than compile the initialisation again.

Ideal weak scaling on real devices keeps the step time constant (relative
1.0). On a CPU, N fake devices (the XLA flag
--xla_force_host_platform_device_count=N, read once when JAX starts, hence
one process per N) all share the same host cores, so the step time grows
with N: there it measures the overhead of partitioning and the collectives,
not scaling. On an accelerator machine no devices are faked: the first N
real devices are used, and an N larger than the machine has is skipped, so
there the table measures scaling. The model is small by default
(InceptionV3 at depth multiplier 0.125, 75 px) so that a CPU step is short.

    python benchmarks/scaling.py [--devices 1 2 4 8] [--per_device_batch 8]
        [--model inception_v3] [--depth_multiplier 0.125] [--image_size 75]
        [--dtype float32] [--steps 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FAKE_FLAG = "--xla_force_host_platform_device_count"

# A child prints this before its JSON, so that anything a library writes to
# stdout cannot be mistaken for the result.
RESULT_MARK = "SCALING_RESULT "


def host_cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def cpu_name() -> str:
  try:
    for line in open("/proc/cpuinfo"):
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return ""


def probe() -> None:
  """Child mode: the real devices, as JSON, with no devices faked."""
  import jax
  devices = jax.devices()
  print(RESULT_MARK + json.dumps({
      "platform": devices[0].platform, "kind": devices[0].device_kind,
      "count": len(devices), "jax": jax.__version__}), flush=True)


def initial_state(trainer, path: str | None):
  """`trainer.init_state(key 0)`, or the one an earlier child saved at
  `path`; and which of the two it was.

  Compiling the initialisation takes half a minute on a CPU, at every N,
  and the persistent compilation cache cannot share it across children
  (its key differs with the device count). Its values are the same at every N
  (one key, parameters independent of the batch), so the first child saves
  them and the others load them into the same structure.
  """
  import jax
  import numpy as np

  key = jax.random.key(0)
  if path and os.path.exists(path):
    abstract = trainer.abstract_state()
    leaves, treedef = jax.tree_util.tree_flatten(abstract)
    with np.load(path) as saved:
      values = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    if [(v.shape, v.dtype) for v in values] == [(l.shape, l.dtype)
                                                for l in leaves]:
      state = jax.tree_util.tree_unflatten(treedef, values)
      return trainer.backend.put_state(state), "loaded"
  state = trainer.init_state(key)
  if path:
    np.savez(path, *jax.device_get(jax.tree_util.tree_leaves(state)))
  return state, "initialised"


def measure(args) -> None:
  """Child mode: compile and time the step on the first `args._child`
  devices; prints the result as JSON."""
  import jax
  import numpy as np

  from cxr_jax import train
  from cxr_jax.config import load_config

  n = args._child
  if len(jax.devices()) < n:
    raise SystemExit(f"{n} devices asked for, {len(jax.devices())} present")
  batch = args.per_device_batch * n
  overrides = [f"batch_size={batch}", f"model_name={args.model}",
               f"model.dtype={args.dtype}", f"image_size={args.image_size}",
               "transfer=false"]
  if args.depth_multiplier != 1.0:
    overrides.append(f"model.depth_multiplier={args.depth_multiplier}")
  c = load_config(str(ROOT / "configs" / "default.py"), overrides)
  start = time.perf_counter()
  trainer = train.Trainer(c, num_devices=n)
  state, init = initial_state(trainer, args._state)
  jax.block_until_ready(state)
  init_s = time.perf_counter() - start
  rng = np.random.default_rng(0)
  placed = trainer.backend.put_batch({
      "image": rng.integers(0, 256, (batch, args.image_size, args.image_size,
                                     1), dtype=np.uint8),
      "labels": (rng.random((batch, 15)) < 0.1).astype(np.float32),
      "mask": np.ones(batch, np.float32)})
  jax.block_until_ready(placed)
  compiled = trainer.compile(state, placed)

  def step_seconds() -> float:
    # The state is donated, so each step waits on the whole new state and
    # the metrics: every time is one complete step, dispatch to result.
    # Blocking each step gives up the overlap of the next dispatch with this
    # step's execution, the same small cost at every N, in exchange for a
    # distribution (median, minimum) rather than one mean.
    nonlocal state
    start = time.perf_counter()
    state, metrics = trainer.step(state, placed)
    jax.block_until_ready((state, metrics))
    return time.perf_counter() - start

  warmup = [step_seconds() for _ in range(args.warmup)]
  times = [step_seconds() for _ in range(args.steps)]
  median = statistics.median(times)
  print(RESULT_MARK + json.dumps({
      "devices": n, "global_batch": batch,
      "per_device_batch": args.per_device_batch,
      "device_names": [str(d) for d in trainer.backend.mesh.devices.flat],
      "step_ms_median": median * 1e3, "step_ms_min": min(times) * 1e3,
      "images_per_s": batch / median,
      "init": init, "init_s": init_s, "compile_s": compiled["seconds"],
      "persistent_cache": compiled["persistent_cache"],
      "warmup_ms": [t * 1e3 for t in warmup],
      "step_ms": [t * 1e3 for t in times]}), flush=True)


def run_child(child_args: list[str], env: dict, timeout: float) -> dict:
  """Runs this script as a child; its result, or {'error': ...}."""
  try:
    done = subprocess.run([sys.executable, __file__, *child_args], env=env,
                          capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {timeout:.0f} s"}
  lines = [l for l in done.stdout.splitlines() if l.startswith(RESULT_MARK)]
  if done.returncode or not lines:
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"exit status {done.returncode}: {tail}"}
  return json.loads(lines[-1][len(RESULT_MARK):])


def child_env(fake_devices: int | None) -> dict:
  """This environment; on a CPU, with `fake_devices` host devices instead
  of any count XLA_FLAGS already asks for."""
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  if fake_devices is not None:
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith(FAKE_FLAG)]
    env["XLA_FLAGS"] = " ".join(flags + [f"{FAKE_FLAG}={fake_devices}"])
  return env


def write_json(args, device: str, jax_version: str, model: str, fake: bool,
               results: list) -> None:
  with open(args.json, "w") as f:
    json.dump({"device": device, "jax": jax_version, "model": model,
               "dtype": args.dtype, "per_device_batch": args.per_device_batch,
               "image_size": args.image_size, "steps": args.steps,
               "warmup": args.warmup, "fake_devices": fake,
               "host_cores": host_cores(), "results": results}, f, indent=2)


def check_args(parser: argparse.ArgumentParser, args) -> None:
  """Flags the children would reject only after starting JAX, refused now."""
  from cxr_jax import models
  for name in ("per_device_batch", "image_size", "steps"):
    if getattr(args, name) < 1:
      parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
  if args.warmup < 0:
    parser.error(f"--warmup must be >= 0, got {args.warmup}")
  if any(n < 1 for n in args.devices):
    parser.error(f"--devices must be >= 1, got {args.devices}")
  if args.model not in models.MODELS:
    parser.error(f"--model {args.model!r} is not a backbone; choose one of "
                 f"{sorted(models.MODELS)}")
  constructor = models.MODELS[args.model][0]
  if args.depth_multiplier != 1.0 and "depth_multiplier" not in getattr(
      constructor, "__dataclass_fields__", {}):
    parser.error(f"--model {args.model} has no depth multiplier: pass "
                 f"--depth_multiplier 1")
  if args.depth_multiplier <= 0:
    parser.error(f"--depth_multiplier must be > 0, got "
                 f"{args.depth_multiplier}")
  smallest = models.min_input_size(args.model)
  if smallest and args.image_size < smallest:
    parser.error(f"--image_size {args.image_size} is below {args.model}'s "
                 f"minimum of {smallest}")


def main():
  parser = argparse.ArgumentParser(
      description="Train step time per device count at a fixed per-device "
                  "batch (weak scaling).")
  parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
  parser.add_argument("--per_device_batch", type=int, default=8)
  parser.add_argument("--model", default="inception_v3")
  parser.add_argument("--depth_multiplier", type=float, default=0.125,
                      help="InceptionV3's channel multiplier; 1 for none")
  parser.add_argument("--image_size", type=int, default=75)
  parser.add_argument("--dtype", default="float32",
                      choices=["float32", "bfloat16"])
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--child_timeout", type=float, default=600,
                      help="seconds allowed to each device count's process")
  parser.add_argument("--json")
  parser.add_argument("--_child", type=int, help=argparse.SUPPRESS)
  parser.add_argument("--_probe", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--_state", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args._probe:
    return probe()
  if args._child is not None:
    return measure(args)
  check_args(parser, args)

  # The parent never starts JAX itself: on an accelerator that would take
  # the devices' memory from the children. A child without fake devices
  # says what the machine has.
  real = run_child(["--_probe"], child_env(None), args.child_timeout)
  if "error" in real:
    raise SystemExit(f"could not start JAX: {real['error']}")
  fake = real["platform"] == "cpu"
  cores = host_cores()
  if fake:
    name = cpu_name()
    device = (f"CPU, {cores} cores{' (' + name + ')' if name else ''}, "
              f"{'/'.join(map(str, args.devices))} fake host devices")
  else:
    device = f"{real['count']} x {real['kind']} ({real['platform']})"
  model = args.model + (f" x{args.depth_multiplier}"
                        if args.depth_multiplier != 1.0 else "")
  print(f"weak scaling of the train step: {model} at {args.image_size}px, "
        f"{args.dtype}, {args.per_device_batch} images per device, "
        f"{args.steps} timed steps after {args.warmup} warm-up, on {device}, "
        f"jax {real['jax']}")
  if fake:
    print(f"fake CPU devices share the same {cores} host cores, so the step "
          f"time grows with N: this measures the overhead of partitioning "
          f"and collectives, not scaling (an accelerator measures scaling)")
  else:
    print("ideal weak scaling: the same step time at every N (x1.00)")

  child_flags = [f"--per_device_batch={args.per_device_batch}",
                 f"--model={args.model}",
                 f"--depth_multiplier={args.depth_multiplier}",
                 f"--image_size={args.image_size}", f"--dtype={args.dtype}",
                 f"--steps={args.steps}", f"--warmup={args.warmup}"]
  results, skipped, failed = [], 0, 0
  with tempfile.TemporaryDirectory(prefix="scaling_") as tmp:
    for n in args.devices:
      if not fake and n > real["count"]:
        skipped += 1
        print(f"N={n}: skipped, the machine has {real['count']} "
              f"{real['platform']} device(s)", flush=True)
        continue
      start = time.perf_counter()
      r = run_child([f"--_child={n}", *child_flags,
                     f"--_state={os.path.join(tmp, 'state.npz')}"],
                    child_env(n if fake else None), args.child_timeout)
      if "error" in r:
        failed += 1
        print(f"N={n}: failed, {r['error']}", flush=True)
        continue
      r["process_s"] = time.perf_counter() - start
      results.append(r)
      print(f"N={n}: {r['step_ms_median']:.1f} ms median step; state "
            f"{r['init']} in {r['init_s']:.1f} s, step compiled in "
            f"{r['compile_s']:.1f} s, {r['process_s']:.0f} s in all",
            flush=True)
      base = min(results, key=lambda x: x["devices"])
      for x in results:
        x["relative_to"] = base["devices"]
        x["relative_step_time"] = x["step_ms_median"] / base["step_ms_median"]
      if args.json:  # after every row: a run cut short keeps what it did
        write_json(args, device, real["jax"], model, fake, results)

  results.sort(key=lambda x: x["devices"])
  base = results[0]["devices"] if results else 1
  print(f"{'N':>3s} {'batch':>5s} {'median ms':>9s} {'min ms':>8s} "
        f"{'images/s':>9s} {'img/s/dev':>9s} {f'vs N={base}':>8s} "
        f"{'compile s':>9s} {'cache':>8s}")
  for r in results:
    print(f"{r['devices']:3d} {r['global_batch']:5d} "
          f"{r['step_ms_median']:9.1f} {r['step_ms_min']:8.1f} "
          f"{r['images_per_s']:9.1f} {r['images_per_s'] / r['devices']:9.1f} "
          f"{r['relative_step_time']:7.2f}x {r['compile_s']:9.1f} "
          f"{r['persistent_cache']:>8s}")
  if skipped:
    print(f"{skipped} of {len(args.devices)} device counts skipped: more "
          f"than the machine's {real['count']} devices")
  if failed:
    raise SystemExit(f"{failed} of {len(args.devices)} device counts failed")


if __name__ == "__main__":
  main()
