"""Does the training loop keep the device busy? The loop's images/s against
the bare step's, in one process, on the same model and batch.

* bare step: `Trainer.train` in a tight loop on one host batch from the real
  pipeline (the host-to-device transfer included), after compilation;
* loop: `train.train_and_evaluate` with the real input pipeline (Grain
  reading a prepared synthetic dataset), metrics, the progress bar,
  asynchronous checkpoints every `--checkpoint_every` steps and one
  validation at the end; and the same loop saving only at the end, which
  separates what the saves cost from the rest of the loop. The loop's rate
  is taken from metrics.jsonl's windows after the first, so compilation is
  left out of both sides.

A small network (InceptionV3 at depth multiplier 0.125, 75 px) keeps a CPU
step short, like an accelerator's, so that any time the loop spends
waiting on the host shows. The windows that follow a checkpoint save are
reported apart: an asynchronous save must not slow them down.

    python benchmarks/loop.py [--steps 120] [--batch 16] [--nonfinite stop]
        [--reps 1] [--num_images 4000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

import jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def prepared_dataset(root: pathlib.Path, image_size: int,
                     num_images: int) -> str:
  """Synthetic films prepared at `image_size` under `root`."""
  from cxr_jax.data import synthetic, tfds_builder
  synthetic.synthesize(str(root / "nih"), num_images=num_images,
                       image_size=max(96, image_size), seed=0)
  tfds_builder.prepare(str(root / "nih"), str(root / "prepared"),
                       image_size=image_size)
  return str(root / "prepared")


def bare_step(config, steps: int) -> dict:
  """Images/s of the step alone on one real host batch, compiled first; and
  of the same step fed by the input pipeline, batch after batch, with
  nothing else around it (where host and device share the cores, as on a
  CPU, the loader's decoding slows the step; on an accelerator it doesn't)."""
  from cxr_jax import train
  from cxr_jax.data import pipeline, splits
  dataset = pipeline.PreparedDataset(config.data_dir, config.image_size)
  names, _ = splits.for_dataset(config, dataset.names)
  batches = iter(pipeline.train_dataset(dataset, names["train"],
                                        config.batch_size, config.seed,
                                        threads=config.loader_threads))
  batch = next(batches)
  trainer = train.Trainer(config)
  state = trainer.init_state(jax.random.key(config.seed))
  start = time.perf_counter()
  state, m = trainer.train(state, batch)
  jax.block_until_ready(m)
  first = time.perf_counter() - start
  state, m = trainer.train(state, batch)
  jax.block_until_ready(m)

  def rate(next_batch):
    """Images/s over all steps, and the median of windows of
    log_every_steps (each ends waiting for its last step, as the loop's
    log steps do)."""
    nonlocal state, m
    window = config.log_every_steps
    seconds = []
    for _ in range(max(1, steps // window)):
      start = time.perf_counter()
      for _ in range(window):
        state, m = trainer.train(state, next_batch())
      jax.block_until_ready((state, m))
      seconds.append(time.perf_counter() - start)
    images = window * config.batch_size
    return (len(seconds) * images / sum(seconds),
            statistics.median(images / s for s in seconds))

  one_batch, one_batch_median = rate(lambda: batch)
  fed, fed_median = rate(lambda: next(batches))
  return {"images_per_s": one_batch, "fed_images_per_s": fed,
          "median_window_images_per_s": one_batch_median,
          "fed_median_window_images_per_s": fed_median,
          "step_ms": config.batch_size / one_batch * 1e3,
          "first_step_s": first}


def loop(config, workdir: str) -> dict:
  """Images/s of train_and_evaluate from its metrics windows after the
  first; windows that follow a checkpoint save, apart."""
  from cxr_jax import checkpoint, train
  # How long each save call holds the loop (the loop calls checkpoint.save
  # through the module, so a wrapper here sees every call).
  blocked, save = [], checkpoint.save

  def timed_save(*args, **kwargs):
    begin = time.perf_counter()
    try:
      return save(*args, **kwargs)
    finally:
      blocked.append(round(time.perf_counter() - begin, 3))

  checkpoint.save = timed_save
  start = time.perf_counter()
  try:
    train.train_and_evaluate(config, workdir)
  finally:
    checkpoint.save = save
  total = time.perf_counter() - start
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  windows = [r for r in rows if "images_per_s" in r][1:]
  images = config.log_every_steps * config.batch_size
  after_save = [r for r in windows
                if (r["step"] - config.log_every_steps) %
                config.checkpoint_every_steps == 0]
  plain = [r for r in windows if r not in after_save]
  rate = lambda rs: (len(rs) * images / sum(images / r["images_per_s"]
                                            for r in rs)) if rs else None
  header = json.load(open(os.path.join(workdir, "run_header.json")))
  return {"images_per_s": rate(windows), "plain_windows": rate(plain),
          "median_window_images_per_s":
              statistics.median(r["images_per_s"] for r in plain)
              if plain else float("nan"),
          "windows_after_a_save": rate(after_save),
          "windows": len(windows), "wall_s": total,
          "save_blocked_s": blocked,
          "compile": header.get("compile")}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=120)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--image_size", type=int, default=75)
  parser.add_argument("--depth_multiplier", type=float, default=0.125)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--log_every", type=int, default=10)
  parser.add_argument("--checkpoint_every", type=int, default=40)
  parser.add_argument("--nonfinite", default="stop", choices=["stop", "skip"])
  parser.add_argument("--loader_threads", type=int, default=2)
  parser.add_argument("--reps", type=int, default=1)
  # Grain's shuffle costs ~65,000 / n microseconds an element under a few
  # tens of thousands of films (45 at 400, 6.5 at 4,000, 3 at ChestX-ray14's
  # 78,000): too few films would charge the loop a cost training never pays.
  parser.add_argument("--num_images", type=int, default=4000)
  parser.add_argument("--json")
  args = parser.parse_args()

  from cxr_jax.config import load_config
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    data = prepared_dataset(tmp, args.image_size, args.num_images)
    config = load_config(str(ROOT / "configs" / "tiny.py"), [
        f"data_dir={data}", f"image_size={args.image_size}",
        f"model.depth_multiplier={args.depth_multiplier}",
        f"model.dtype={args.dtype}",
        "model.output_stride=32", f"batch_size={args.batch}",
        f"num_train_steps={args.steps}", f"log_every_steps={args.log_every}",
        f"checkpoint_every_steps={args.checkpoint_every}",
        f"eval_every_steps={args.steps}", "max_eval_images=64",
        f"nonfinite={args.nonfinite}",
        f"loader_threads={args.loader_threads}",
        f"compilation_cache_dir={tmp / 'xla_cache'}"])
    # The same loop with no save until the end: what the saves cost, apart
    # from everything else the loop does.
    unsaved = config.copy_and_resolve_references()
    unsaved.checkpoint_every_steps = args.steps + 1
    runs = []
    for rep in range(args.reps):  # interleaved, so drift hits both sides
      bare = bare_step(config, args.steps)
      looped = loop(config, str(tmp / f"run{rep}"))
      no_saves = loop(unsaved, str(tmp / f"unsaved{rep}"))
      runs.append({"bare": bare, "loop": looped, "loop_without_saves": no_saves,
                   "ratio": looped["images_per_s"] / bare["images_per_s"],
                   "ratio_without_saves": no_saves["images_per_s"] /
                                          bare["images_per_s"],
                   "ratio_to_fed": looped["images_per_s"] /
                                   bare["fed_images_per_s"],
                   # The loop's own cost, the loader's share of the cores
                   # left out (what an accelerator host would see).
                   "ratio_without_saves_to_fed":
                       no_saves["images_per_s"] / bare["fed_images_per_s"],
                   # Windows of log_every_steps, medians: a stall of the
                   # machine (0.2-0.35 s, seen in the bare step alone on
                   # shared cloud cores) moves one window, not the median.
                   "median_window_ratio_without_saves":
                       no_saves["median_window_images_per_s"] /
                       bare["median_window_images_per_s"],
                   "median_window_ratio":
                       looped["median_window_images_per_s"] /
                       bare["median_window_images_per_s"]})
  device = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
  # Each ratio's median over the repetitions, under the run's key.
  medians = {k: statistics.median(r[k] for r in runs)
             for k in runs[0] if "ratio" in k}
  print(f"loop vs bare step: InceptionV3 x{args.depth_multiplier} at "
        f"{args.image_size}px, global batch {args.batch}, "
        f"{args.num_images} films, {device}, "
        f"jax {jax.__version__}, {os.cpu_count()} host cores, "
        f"nonfinite={args.nonfinite}")
  for r in runs:
    b, l = r["bare"], r["loop"]
    print(f"  bare {b['images_per_s']:.1f} img/s ({b['step_ms']:.1f} ms/step,"
          f" first step {b['first_step_s']:.1f} s), fed by the pipeline "
          f"{b['fed_images_per_s']:.1f} | loop "
          f"{l['images_per_s']:.1f} img/s (windows without a save "
          f"{l['plain_windows'] or float('nan'):.1f}, after a save "
          f"{l['windows_after_a_save'] or float('nan'):.1f}; compile "
          f"{l['compile']}; each save blocked {l['save_blocked_s']} s) | "
          f"ratio {r['ratio']:.3f} | loop without saves "
          f"{r['loop_without_saves']['images_per_s']:.1f} img/s, ratio "
          f"{r['ratio_without_saves']:.3f} | median windows: bare "
          f"{b['median_window_images_per_s']:.1f}, fed "
          f"{b['fed_median_window_images_per_s']:.1f}, loop without a "
          f"save {l['median_window_images_per_s']:.1f}, loop without saves "
          f"{r['loop_without_saves']['median_window_images_per_s']:.1f}")
  print(f"median ratio loop / bare: {medians['ratio']:.3f}; loop / step "
        f"fed by the pipeline: {medians['ratio_to_fed']:.3f}; loop without "
        f"saves / bare: {medians['ratio_without_saves']:.3f}, / fed: "
        f"{medians['ratio_without_saves_to_fed']:.3f}")
  print(f"median windows, loop without saves / bare: "
        f"{medians['median_window_ratio_without_saves']:.3f}; loop's "
        f"windows without a save / bare: "
        f"{medians['median_window_ratio']:.3f}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"device": device, "jax": jax.__version__,
                 "args": vars(args), "runs": runs, **medians}, f, indent=2)


if __name__ == "__main__":
  main()
