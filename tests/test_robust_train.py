"""Bad inputs and accidents in training and resume (issue 13): non-finite
learning rates and validations, a missing data_dir, unreadable or
mismatched checkpoints, two writers on one workdir, and a soak test of
repeated preemption and a SIGKILL."""

import json
import logging
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import SmallNet, random_batches, small_model, train_config
from cxr_jax import checkpoint, models, train
from cxr_jax.metric_log import MetricLog
from cxr_jax.preemption import FolderBusy, FolderLock, NonFiniteLoss

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_a_nan_learning_rate_never_reaches_the_parameters():
  """The loss and gradient are finite; the update is not: skipped."""
  trainer = train.Trainer(train_config(learning_rate=float("nan")),
                          num_devices=2, model_fn=small_model)
  state = trainer.init_state(jax.random.key(0))
  before = jax.device_get(state.params)
  state, m = trainer.train(state, random_batches(1)[0])
  host = jax.device_get(state)
  assert np.isfinite(float(m["loss"]))
  assert not bool(m["finite"]) and int(host.nonfinite_steps) == 1
  for x, y in zip(jax.tree_util.tree_leaves(host.params),
                  jax.tree_util.tree_leaves(before)):
    np.testing.assert_array_equal(x, y)


def test_training_without_a_dataset_names_the_flag(tmp_path):
  with pytest.raises(ValueError, match=r"--config\.data_dir=DIR"):
    train.train_and_evaluate(train_config(data_dir=""), str(tmp_path))
  with pytest.raises(FileNotFoundError,
                     match=r"--config\.data_dir=/no/such: no such folder"):
    train.train_and_evaluate(train_config(data_dir="/no/such"),
                             str(tmp_path))


def _small_run(data_dir, **overrides):
  c = train_config(**{
      "data_dir": data_dir, "model_name": "small_net", "num_train_steps": 4,
      "eval_every_steps": 4, "checkpoint_every_steps": 4,
      "log_every_steps": 2, "batch_size": 8, "loader_threads": 1,
      "max_eval_images": 16, **overrides})
  c.model = {"dtype": "float32"}
  return c


def test_a_nonfinite_validation_is_never_best_and_a_changed_config_is_refused(
    tiny_data, tmp_path, monkeypatch):
  monkeypatch.setitem(models.MODELS, "small_net", (SmallNet, {}))
  nan = float("nan")
  monkeypatch.setattr(train.Trainer, "validate", lambda *a: {
      "aucs": np.full(14, nan), "mean": nan, "defined": 0, "loss": nan})
  workdir = str(tmp_path / "run")
  summary = train.train_and_evaluate(_small_run(tiny_data), workdir)
  # A validation with non-finite metrics is saved, never marked best.
  assert summary["step"] == 4 and summary["best_step"] is None
  assert checkpoint.manager(workdir, read_only=True).best_step() is None
  # Another model option or learning rate is another experiment: refused,
  # naming the keys, before Orbax sees a mismatched tree.
  changed = _small_run(tiny_data, num_train_steps=8, learning_rate=0.1)
  changed.model = {"dtype": "float32", "head_pooling": "lse"}
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"checkpoints/4: the config differs.*"
                           r"learning_rate: 0\.05 -> 0\.1; "
                           r"model\.head_pooling: \(unset\) -> \"lse\""):
    train.train_and_evaluate(changed, workdir)


def test_nonfinite_stop_names_its_step_and_no_checkpoint_holds_it(
    tiny_data, tmp_path, monkeypatch):
  # The loop reads the steps' finite flags only before a log, a save or a
  # validation: step 4 is named, and neither its checkpoint nor its log is
  # written.
  monkeypatch.setitem(models.MODELS, "small_net", (SmallNet, {}))
  real_step = train.Trainer.step

  def nan_at_step_4(self, state, batch):
    state, m = real_step(self, state, batch)
    return state, {**m, "finite": m["finite"] & (state.step != 4)}

  monkeypatch.setattr(train.Trainer, "step", nan_at_step_4)
  workdir = tmp_path / "run"
  c = _small_run(tiny_data, nonfinite="stop", num_train_steps=6,
                 checkpoint_every_steps=2, eval_every_steps=100,
                 log_every_steps=4)
  with pytest.raises(NonFiniteLoss, match=r"at step 4 \(learning "):
    train.train_and_evaluate(c, str(workdir))
  assert _steps_saved(workdir) == [2]
  assert not (workdir / "metrics.jsonl").read_text()


class _Unread:
  """A finite flag that fails the test if the host reads it."""

  def __bool__(self):
    raise AssertionError("the flag was read before check()")

  __array__ = __bool__


def test_nonfinite_watch_reads_flags_only_when_checked():
  from cxr_jax.preemption import NonfiniteWatch
  watch = NonfiniteWatch(True, lambda step, m: f"step {step}: {m['note']}")
  for step in range(1, 4):
    watch.add(step, {"finite": _Unread(), "note": step})
  watch.pending = [(s, {**m, "finite": jnp.asarray(s != 2)})
                   for s, m in watch.pending]
  watch.add(4, {"finite": jnp.asarray(False), "note": 4})
  with pytest.raises(NonFiniteLoss, match=r"^step 2: 2$"):  # the first
    watch.check()
  watch.pending = [(5, {"finite": jnp.asarray(True)})]
  watch.check()
  assert watch.pending == []
  idle = NonfiniteWatch(False, None)  # nonfinite='skip': keeps nothing
  idle.add(1, {"finite": _Unread()})
  idle.check()


def _toy_checkpoints(workdir, steps, config):
  mgr = checkpoint.manager(workdir)
  state = {"w": jnp.arange(4.0), "b": {"c": jnp.ones((2, 3))}}
  for step in steps:
    checkpoint.save(mgr, step, jax.tree_util.tree_map(lambda x: x * step,
                                                      state),
                    {"position": step}, config)
  mgr.wait_until_finished()
  mgr.close()
  return state


def test_an_unreadable_newest_step_falls_back_and_two_are_refused(
    tmp_path, caplog):
  config = ml_collections.ConfigDict({"learning_rate": 0.5,
                                      "model": {"depth": 2}})
  workdir = str(tmp_path)
  target = _toy_checkpoints(workdir, [4], config)
  ckpt = pathlib.Path(workdir) / "checkpoints"
  # A truncated newest step, and an empty one (a copy that never finished).
  shutil.copytree(ckpt / "4", ckpt / "8")
  for f in (ckpt / "8" / "state").rglob("*"):
    if f.is_file():
      f.write_bytes(f.read_bytes()[:len(f.read_bytes()) // 2])
  (ckpt / "12").mkdir()
  mgr = checkpoint.manager(workdir)
  with caplog.at_level(logging.WARNING, logger="cxr_jax"):
    step, state, data = checkpoint.resume(mgr, target, config)
  assert step == 4 and data == {"position": 4}
  np.testing.assert_array_equal(state["w"], np.arange(4.0) * 4)
  for bad in (8, 12):
    assert f"checkpoint {ckpt / str(bad)} is unreadable" in caplog.text
    assert (tmp_path / "checkpoints_unreadable" / str(bad)).is_dir()
  assert "resuming from step 4 instead; moved it to " in caplog.text
  assert mgr.all_steps() == [4]
  # Nothing readable: both folders are named, and nothing is moved.
  for bad in (ckpt / "4" / "state", ckpt / "4" / "config"):
    shutil.rmtree(bad)
  (ckpt / "9").mkdir()
  mgr.reload()
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"checkpoints/9 is unreadable.*checkpoints/4 is "
                           r"unreadable"):
    checkpoint.resume(mgr, target, config)
  assert sorted(p.name for p in ckpt.iterdir()) == ["4", "9"]


def test_config_differences_name_keys_that_change_the_run():
  saved = {"learning_rate": float("nan"), "num_train_steps": 10,
           "model": {"depth": 2, "width": 3}}
  now = ml_collections.ConfigDict({
      "learning_rate": float("nan"), "num_train_steps": 20,  # resumable
      "added_since": 1,  # a key newer than the checkpoint: not compared
      "model": {"depth": 2, "stride": 16}})
  assert checkpoint.config_differences(saved, now) == [
      "model.stride: (unset) -> 16", "model.width: 3 -> (unset)"]


def test_one_writer_per_workdir_and_a_stale_lock_is_taken_over(tmp_path,
                                                               caplog):
  workdir = str(tmp_path / "run")
  c = train_config(data_dir=str(tmp_path))
  with FolderLock(workdir, "train"):
    with pytest.raises(FolderBusy, match=rf"run is in use by another train: "
                       rf"pid {os.getpid()} on host {socket.gethostname()}"):
      train.train_and_evaluate(c, workdir)
  # A holder that dies without releasing (SIGKILL): the kernel drops its
  # lock, its note stays behind.
  dead = subprocess.run(
      [sys.executable, "-c", "import os, sys; from cxr_jax.preemption import "
       "FolderLock; FolderLock(sys.argv[1], 'train').__enter__(); "
       "print(os.getpid(), flush=True); os._exit(0)", workdir],
      env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
      text=True, check=True)
  with caplog.at_level(logging.WARNING, logger="cxr_jax"):
    with FolderLock(workdir, "train"):
      note = json.loads(pathlib.Path(workdir, ".cxr_jax.lock").read_text())
      assert note["pid"] == os.getpid()
  assert f"stale lock of pid {dead.stdout.strip()} on host" in caplog.text
  assert pathlib.Path(workdir, ".cxr_jax.lock").read_text() == ""


def test_a_resumed_run_drops_the_records_it_recomputes(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(json.dumps({"step": s, "train_loss": 1.0}) + "\n"
                          for s in range(1, 11)) + '{"step": 11, "tr')
  with MetricLog(str(tmp_path), resume_step=6) as log:
    log.write(7, {"train_loss": 2.0})
  steps = [json.loads(l)["step"] for l in path.read_text().splitlines()]
  assert steps == [1, 2, 3, 4, 5, 6, 7]


# ------------------------------------------------------------------- soak

_DRIVER = """
import os, sys, time
sys.path.insert(0, {tests!r})
import conftest
from cxr_jax import cli, models, train

models.MODELS["small_net"] = (conftest.SmallNet, {{}})
step = train.Trainer.step


def paced(self, state, batch):
  # Steps of a small net take milliseconds: pace them so that signals land
  # mid-run.
  time.sleep({delay})
  return step(self, state, batch)


train.Trainer.step = paced
sys.exit(cli.main(sys.argv[1:]))
"""


def _soak_cmd(driver, workdir, data, steps=24):
  return [sys.executable, str(driver), "train", "--config",
          str(ROOT / "configs" / "default.py"), "--workdir", str(workdir),
          f"--config.data_dir={data}", "--config.image_size=75",
          "--config.model_name=small_net", "--config.transfer=false",
          "--config.optimizer=adam", "--config.learning_rate=0.001",
          f"--config.num_train_steps={steps}", "--config.batch_size=8",
          "--config.eval_every_steps=12", "--config.max_eval_images=32",
          "--config.eval_batch_size=16", "--config.checkpoint_every_steps=4",
          "--config.log_every_steps=2", "--config.loader_threads=1"]


def _steps_saved(workdir) -> list[int]:
  ckpt = pathlib.Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) \
      if ckpt.exists() else []


def _interrupt(cmd, env, workdir, sig, timeout=120):
  """Starts a run, waits for a checkpoint newer than the ones before it,
  sends `sig`; returns (exit code, stderr)."""
  before = max(_steps_saved(workdir), default=0)
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  start = time.time()
  while max(_steps_saved(workdir), default=0) <= before:
    if proc.poll() is not None or time.time() - start > timeout:
      proc.kill()
      pytest.fail(f"no new checkpoint: {proc.communicate()[1][-3000:]}")
    time.sleep(0.05)
  proc.send_signal(sig)
  _, err = proc.communicate(timeout=timeout)
  return proc.returncode, err


@pytest.mark.slow
def test_soak_preempted_and_killed_runs_end_bit_identical(tiny_data,
                                                          tmp_path):
  driver = tmp_path / "driver.py"
  driver.write_text(_DRIVER.format(tests=str(ROOT / "tests"), delay=0.15))
  env = dict(os.environ, PYTHONPATH=str(ROOT),
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  reference = subprocess.Popen(_soak_cmd(driver, tmp_path / "ref", tiny_data),
                               env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
  run = tmp_path / "run"
  cmd = _soak_cmd(driver, run, tiny_data)
  for _ in range(2):
    code, err = _interrupt(cmd, env, run, signal.SIGTERM)
    assert code == 143 and "SIGTERM: saved step" in err, err[-3000:]
  code, _ = _interrupt(cmd, env, run, signal.SIGKILL)
  assert code == -signal.SIGKILL
  last = subprocess.run(cmd, env=env, capture_output=True, text=True,
                        timeout=300)
  assert last.returncode == 0, last.stderr[-3000:]
  assert "taking over a stale lock" in last.stderr
  _, err = reference.communicate(timeout=300)
  assert reference.returncode == 0, err[-3000:]

  got, config = checkpoint.restore(str(run), "latest")
  want, ref_config = checkpoint.restore(str(tmp_path / "ref"), "latest")
  assert config.restored_step == ref_config.restored_step == 24
  for a, b in zip(jax.tree_util.tree_leaves(got),
                  jax.tree_util.tree_leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  records = [json.loads(line) for line in
             (run / "metrics.jsonl").read_text().splitlines()]
  train_steps = [r["step"] for r in records if "train_loss" in r]
  val_steps = [r["step"] for r in records if "val_loss" in r]
  assert train_steps == list(range(2, 25, 2)) and val_steps == [12, 24]
  assert (run / "tensorboard").is_dir()

  # A larger num_train_steps on the finished workdir continues the run.
  more = subprocess.run(_soak_cmd(driver, run, tiny_data, steps=28), env=env,
                        capture_output=True, text=True, timeout=300)
  assert more.returncode == 0, more.stderr[-3000:]
  assert checkpoint.restore(str(run), "latest")[1].restored_step == 28
  records = [json.loads(line) for line in
             (run / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if "train_loss" in r][-2:] == [26, 28]
