"""Training: N devices (shard_map or pmap) equal one, steps are pure, the loop
learns, checkpoints keep the best, and a killed run resumes exactly."""

import functools
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxr_jax import checkpoint, train
from cxr_jax import labels as L
from cxr_jax.config import apply_overrides, load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


class SmallNet(nn.Module):
  """Conv + synchronised BatchNorm + head: the collectives of InceptionV3's
  training step at a fraction of its compile time."""

  num_classes: int = 15
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(8, (3, 3), strides=(2, 2), use_bias=False)(x)
    x = nn.BatchNorm(use_running_average=not train, use_scale=False,
                     epsilon=1e-3, momentum=0.9,
                     axis_name=self.bn_axis_name if train else None)(x)
    x = nn.relu(x)
    x = nn.Conv(16, (3, 3), strides=(2, 2), use_bias=False)(x)
    x = nn.BatchNorm(use_running_average=not train, use_scale=False,
                     epsilon=1e-3, momentum=0.9,
                     axis_name=self.bn_axis_name if train else None)(x)
    x = nn.relu(x).mean(axis=(1, 2))
    return nn.Dense(self.num_classes)(x)


def small_model(config, axis_name):
  return SmallNet(bn_axis_name=axis_name if config.sync_batch_stats else None)


def _config(**overrides):
  c = load_config(str(ROOT / "configs" / "tiny.py"))
  # SGD: Adam and Adadelta divide by |g|, which turns float rounding in
  # near-zero gradients into sign flips; a linear update can be compared to
  # float32 tolerance.
  c.optimizer, c.learning_rate = "sgd", 0.05
  c.image_size, c.batch_size = 75, 16
  c.loss = "cw_cel_fine_grained"  # per-class counts: the strictest case
  for k, v in overrides.items():
    c[k] = v
  return c


def _batches(n=3, size=75, batch=16, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    labels = (rng.random((batch, 15)) < 0.2).astype(np.float32)
    out.append({"image": rng.integers(0, 256, (batch, size, size, 1)).astype(
        np.uint8), "labels": labels, "mask": np.ones(batch, np.float32)})
  return out


def _run(config, num_devices, batches, model_fn=small_model):
  trainer = train.Trainer(config, num_devices=num_devices, model_fn=model_fn)
  state = trainer.init_state(jax.random.key(0))
  init = jax.device_get(trainer.host_state(state).params)
  losses = []
  for b in batches:
    state, m = trainer.train(state, b)
    losses.append(float(m["loss"]))
  host = jax.device_get(trainer.host_state(state))
  delta = jax.tree_util.tree_map(lambda a, b: a - b, host.params, init)
  return losses, delta, host.batch_stats


def _rel(a, b):
  a = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(a)])
  b = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(b)])
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("mode", ["shard_map", "pmap"])
def test_eight_devices_equal_one(mode):
  batches = _batches()
  ref = _run(_config(parallel="shard_map"), 1, batches)
  got = _run(_config(parallel=mode), 8 if mode == "shard_map" else None,
             batches)
  err = {"loss": max(abs(a - b) / abs(b) for a, b in zip(got[0], ref[0])),
         "param_updates": _rel(got[1], ref[1]),
         "batch_stats": _rel(got[2], ref[2])}
  print(f"{mode} x8 vs 1 device after 3 steps: {err}")
  assert max(err.values()) < 1e-5, err


def test_without_sync_batch_stats_devices_differ():
  """The BN sync is what makes N devices equal one (the test can fail)."""
  batches = _batches()
  ref = _run(_config(), 1, batches)
  got = _run(_config(sync_batch_stats=False), 8, batches)
  assert _rel(got[1], ref[1]) > 1e-3  # per-device normalisation differs


def test_inception_v3_eight_devices_equal_one_in_float64():
  """InceptionV3's real step, 8 devices vs 1, in float64 (a subprocess: x64
  must be set before JAX starts).

  Why float64: a randomly initialised InceptionV3 in training mode (BatchNorm
  over 1x1 late maps at 75 px) is ill-conditioned, so in float32 merely
  reordering the batch on one device moves its gradient by 1-3% (measured),
  and 8 devices land within that spread. In float64 the same comparison is
  exact up to the float32 storage of parameters: that proves the step; the
  float32 spread is rounding, not a missing term.
  """
  out = subprocess.run([sys.executable, str(ROOT / "tests" /
                                            "x64_equivalence.py")],
                       capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  err = json.loads(out.stdout.strip().splitlines()[-1])
  print(f"InceptionV3 float64, shard_map x8 vs 1 device, one step: {err}")
  assert err["loss"] < 1e-12 and err["batch_stats"] < 1e-12, err
  assert err["gradient"] < 1e-6, err  # parameters and grads stored in float32


def test_nonfinite_updates_are_skipped_and_counted():
  c = _config(loss="w_cel_faithful", nonfinite="skip")
  trainer = train.Trainer(c, num_devices=2, model_fn=small_model)
  state = trainer.init_state(jax.random.key(0))
  before = jax.device_get(trainer.host_state(state).params)
  b = _batches(1)[0]
  b["labels"][:] = 0  # no positive: the faithful W-CEL is NaN
  state, m = trainer.train(state, b)
  host = jax.device_get(trainer.host_state(state))
  assert not bool(m["finite"]) and int(host.nonfinite_steps) == 1
  assert int(host.step) == 1
  for x, y in zip(jax.tree_util.tree_leaves(host.params),
                  jax.tree_util.tree_leaves(before)):
    np.testing.assert_array_equal(x, y)


def test_config_overrides_are_typed_and_checked():
  c = load_config(str(ROOT / "configs" / "default.py"),
                  ["--config.batch_size=64", "config.aux_task=false",
                   "learning_rate=0.5", "parallel=pmap"])
  assert (c.batch_size, c.aux_task, c.learning_rate, c.parallel) == (
      64, False, 0.5, "pmap")
  with pytest.raises(KeyError, match="unknown config key 'batchsize'"):
    apply_overrides(c, ["batchsize=3"])
  for path in sorted((ROOT / "configs").glob("*.py")):
    if path.name != "__init__.py":
      cfg = load_config(str(path))
      assert cfg.loss and cfg.num_train_steps > 0, path.name


# ------------------------------------------------------- end to end (CLI)

@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
  from cxr_jax.data import synthetic, tfds_builder
  root = tmp_path_factory.mktemp("tiny")
  synthetic.synthesize(str(root / "nih"), num_images=160, image_size=96,
                       seed=3, workers=2)
  tfds_builder.prepare(str(root / "nih"), str(root / "prepared"),
                       image_size=75, workers=2)
  return str(root / "prepared")


def _train_cmd(workdir, data, steps=12):
  return [sys.executable, "-m", "cxr_jax.cli", "train", "--config",
          str(ROOT / "configs" / "tiny.py"), "--workdir", str(workdir),
          f"--config.data_dir={data}", "--config.image_size=75",
          f"--config.num_train_steps={steps}", "--config.eval_every_steps=100",
          "--config.checkpoint_every_steps=4", "--config.log_every_steps=4",
          "--config.batch_size=8", "--config.loader_threads=1"]


def _env():
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  env["PYTHONPATH"] = str(ROOT)
  return env


def _final_params(workdir):
  variables, config = checkpoint.restore(str(workdir), "latest")
  return variables["params"], config.restored_step


def _wait_for_checkpoint(workdir, proc, at_least=4, timeout=300):
  ckpt = pathlib.Path(workdir) / "checkpoints"
  start = time.time()
  while time.time() - start < timeout:
    steps = [int(p.name) for p in ckpt.iterdir() if p.name.isdigit()] \
        if ckpt.exists() else []
    if steps and max(steps) >= at_least:
      return max(steps)
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    time.sleep(0.2)
  raise TimeoutError("no checkpoint appeared")


def test_killed_and_preempted_runs_resume_to_the_same_parameters(tiny_data,
                                                                 tmp_path):
  env = _env()
  ref_dir = tmp_path / "uninterrupted"
  subprocess.run(_train_cmd(ref_dir, tiny_data), env=env, check=True,
                 capture_output=True, timeout=600)
  ref, ref_step = _final_params(ref_dir)
  assert ref_step == 12

  # One run, interrupted twice: SIGTERM after its first checkpoint (it must
  # save the current step and exit 143), then SIGKILL after a later one.
  run = tmp_path / "interrupted"
  proc = subprocess.Popen(_train_cmd(run, tiny_data), env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  _wait_for_checkpoint(run, proc, at_least=4)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 143, err[-2000:]
  assert "SIGTERM: saved step" in err
  saved = max(int(p.name) for p in (run / "checkpoints").iterdir()
              if p.name.isdigit())
  proc = subprocess.Popen(_train_cmd(run, tiny_data), env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  _wait_for_checkpoint(run, proc, at_least=saved + 1)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  subprocess.run(_train_cmd(run, tiny_data), env=env, check=True,
                 capture_output=True, timeout=600)
  header = json.loads((run / "run_header.json").read_text())
  assert header["resumed_from_step"] > saved
  params, step = _final_params(run)
  assert step == 12
  for a, b in zip(jax.tree_util.tree_leaves(params),
                  jax.tree_util.tree_leaves(ref)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Analysis on the finished run: restore on another topology (1 device
  # here, 2 in training), evaluate and localize.
  from cxr_jax import evaluation, localization
  result = evaluation.evaluate(str(ref_dir), "latest", "test",
                               num_resamples=50)
  out = ref_dir / "eval" / "test"
  for name in ("auc.csv", "predictions.csv", "roc.png", "metrics.json"):
    assert (out / name).exists(), name
  saved = json.loads((out / "metrics.json").read_text())
  assert saved["num_images"] == result["num_images"] > 0
  assert set(saved["auc"]) == set(L.DISEASES)
  rows = (out / "predictions.csv").read_text().splitlines()
  assert len(rows) == saved["num_images"] + 1
  loc = localization.localize(str(ref_dir), which="latest", max_overlays=2)
  assert loc["boxes"] > 0 and (pathlib.Path(loc["out_dir"]) /
                               "localization.csv").exists()

  # A larger num_train_steps on the same workdir continues the run.
  subprocess.run(_train_cmd(ref_dir, tiny_data, steps=16), env=env,
                 check=True, capture_output=True, timeout=600)
  assert _final_params(ref_dir)[1] == 16
  lines = [json.loads(l) for l in (ref_dir / "metrics.jsonl").read_text(
  ).splitlines()]
  assert any("val_mean_auc" in l for l in lines)
  assert (ref_dir / "tensorboard").is_dir()


def test_two_processes_equal_one_process_with_four_devices(tmp_path):
  """jax.distributed on localhost (gloo CPU collectives): 2 processes x 2
  devices, each feeding only its share, equal 1 process x 4 devices."""
  import portpicker
  worker = str(ROOT / "tests" / "multiprocess_worker.py")
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  env.pop("XLA_FLAGS", None)
  port = portpicker.pick_unused_port()
  procs = [subprocess.Popen([sys.executable, worker, str(p), "2", str(port),
                             "2", str(tmp_path / "multi.npz")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for p in range(2)]
  for p in procs:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
  subprocess.run([sys.executable, worker, "0", "1", "0", "4",
                  str(tmp_path / "single.npz")], env=env, check=True,
                 capture_output=True, timeout=600)
  multi, single = np.load(tmp_path / "multi.npz"), np.load(tmp_path /
                                                           "single.npz")
  assert int(multi["devices"]) == int(single["devices"]) == 4
  np.testing.assert_allclose(multi["losses"], single["losses"], rtol=1e-6)
  for key in single.files:
    if key.startswith(("param_", "stats_")):
      np.testing.assert_allclose(multi[key], single[key], rtol=1e-5,
                                 atol=1e-7, err_msg=key)


def test_cosine_schedule_reaches_zero_at_the_last_step():
  c = _config(optimizer="sgd", learning_rate=0.5, num_train_steps=4,
              lr_schedule="cosine")
  tx = train.build_optimizer(c)
  params = jnp.zeros(())
  state = tx.init(params)
  moves = []
  for _ in range(5):
    updates, state = tx.update(jnp.ones(()), state, params)
    moves.append(-float(updates))
  # 0.5 * (1 + cos(pi * t / 4)) / 2 for t = 0..4, then held at 0.
  want = [0.5 * (1 + np.cos(np.pi * t / 4)) / 2 for t in range(5)]
  np.testing.assert_allclose(moves, want, atol=1e-7)
  with pytest.raises(ValueError, match="lr_schedule"):
    train.build_optimizer(_config(lr_schedule="linear"))
