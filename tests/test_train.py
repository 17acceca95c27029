"""Training: N devices (shard_map or pmap) equal one, steps are pure, the loop
learns, checkpoints keep the best, and a killed run resumes exactly."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import (ROOT, SmallNet, random_batches, rel_error, run_steps,
                      small_model, train_config)
from cxr_jax import (checkpoint, inference, losses, models, optim, train)
from cxr_jax import labels as L
from cxr_jax.config import apply_overrides, load_config


@pytest.mark.parametrize("mode", ["shard_map", "pmap"])
def test_eight_devices_equal_one(mode):
  batches = random_batches()
  ref = run_steps(train_config(parallel="shard_map"), 1, batches)
  got = run_steps(train_config(parallel=mode), 8 if mode == "shard_map" else None,
             batches)
  err = {"loss": max(abs(a - b) / abs(b) for a, b in zip(got[0], ref[0])),
         "param_updates": rel_error(got[1], ref[1]),
         "batch_stats": rel_error(got[2], ref[2])}
  print(f"{mode} x8 vs 1 device after 3 steps: {err}")
  assert max(err.values()) < 1e-5, err


def test_without_sync_batch_stats_devices_differ():
  """The BN sync is what makes N devices equal one (the test can fail)."""
  batches = random_batches()
  ref = run_steps(train_config(), 1, batches)
  got = run_steps(train_config(sync_batch_stats=False), 8, batches)
  assert rel_error(got[1], ref[1]) > 1e-3  # per-device normalisation differs


@pytest.mark.slow
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
  c = train_config(loss="w_cel_faithful", nonfinite="skip")
  trainer = train.Trainer(c, num_devices=2, model_fn=small_model)
  state = trainer.init_state(jax.random.key(0))
  before = jax.device_get(state.params)
  b = random_batches(1)[0]
  b["labels"][:] = 0  # no positive: the faithful W-CEL is NaN
  state, m = trainer.train(state, b)
  host = jax.device_get(state)
  assert not bool(m["finite"]) and int(host.nonfinite_steps) == 1
  assert int(host.step) == 1
  for x, y in zip(jax.tree_util.tree_leaves(host.params),
                  jax.tree_util.tree_leaves(before)):
    np.testing.assert_array_equal(x, y)


def test_pmap_keeps_one_logical_state_and_scalar_metrics():
  """pmap with in_axes=(None, 0): no per-device copies to unreplicate, so
  the loop reads a counter without moving the state to the host."""
  trainer = train.Trainer(train_config(parallel="pmap"), model_fn=small_model)
  state = trainer.init_state(jax.random.key(0))
  shapes = jax.tree_util.tree_map(np.shape, state.params)
  state, m = trainer.train(state, random_batches(1)[0])
  assert jax.tree_util.tree_map(np.shape, state.params) == shapes
  assert np.shape(state.nonfinite_steps) == () and np.shape(m["loss"]) == ()
  assert int(state.step) == 1


@pytest.mark.parametrize("mode", ["shard_map", "pmap"])
def test_abstract_state_is_init_states_shapes_and_placement(mode):
  """What a resume restores into, without compiling the init."""
  trainer = train.Trainer(train_config(parallel=mode), model_fn=small_model)
  abstract = trainer.abstract_state()
  state = trainer.init_state(jax.random.key(0))
  # (The static fields, the optimizer's functions, are new objects.)
  paths = lambda tree: [p for p, _ in
                        jax.tree_util.tree_flatten_with_path(tree)[0]]
  assert paths(abstract) == paths(state)
  for a, s in zip(jax.tree_util.tree_leaves(abstract),
                  jax.tree_util.tree_leaves(state)):
    assert isinstance(a, jax.ShapeDtypeStruct)
    assert (a.shape, a.dtype) == (s.shape, s.dtype)
    assert a.sharding.is_equivalent_to(s.sharding, s.ndim)


def test_validation_weights_each_batch_by_its_global_images():
  """On several hosts a batch's loss is global, so its weight must be the
  global image count (the forward pass returns it), not this host's."""

  class Fake:  # an Inference whose forward pass reports given values
    def launch(self, variables, batch):
      return batch

    def collect(self, batch):
      return {"probs": np.zeros((len(batch["mask"]), 15)),
              "loss": batch["loss"], "images": batch["global_images"]}

  batches = []
  for loss, local, global_ in ((1.0, 4, 8), (3.0, 1, 2)):
    mask = np.zeros(4, np.float32)
    mask[:local] = 1
    batches.append({"mask": mask, "labels": np.zeros((4, 15)),
                    "index": np.arange(4), "loss": loss,
                    "global_images": float(global_)})
  out = inference.predict_batches(Fake(), None, batches)
  assert out["loss"] == pytest.approx((1.0 * 8 + 3.0 * 2) / 10)
  assert len(out["probs"]) == 5


def test_config_overrides_are_typed_and_checked():
  c = load_config(str(ROOT / "configs" / "default.py"),
                  ["--config.batch_size=64", "config.aux_task=false",
                   "learning_rate=0.5", "parallel=pmap",
                   "model.output_stride=16", "model.conv_init=delta"])
  assert (c.batch_size, c.aux_task, c.learning_rate, c.parallel) == (
      64, False, 0.5, "pmap")
  # config.model is open: its keys are checked by the model they build.
  assert (c.model.output_stride, c.model.conv_init) == (16, "delta")
  with pytest.raises(KeyError, match="unknown config key 'batchsize'"):
    apply_overrides(c, ["batchsize=3"])
  c.model.not_an_option = 1
  with pytest.raises(models.ModelConfigError,
                     match="config.model.not_an_option"):
    models.from_config(c)


def test_every_config_builds_its_model_and_optimizer():
  """Each config file, and each row of configs/paper.py, loads, names a
  registered backbone whose options it fits, and a working optimizer."""
  from configs import paper
  paths = [str(p) for p in sorted((ROOT / "configs").glob("*.py"))
           if p.name not in ("__init__.py", "paper.py")]
  paths += [f"{ROOT / 'configs' / 'paper.py'}:{row}" for row in paper.ROWS]
  for path in paths:
    c = load_config(path)
    assert c.loss in losses.LOSSES, path
    assert c.model_name in models.MODELS, (path, c.model_name)
    model = models.from_config(c)
    assert model.num_classes == L.NUM_OUTPUTS
    optim.from_config(c)
  with pytest.raises(ValueError, match="table2_cwcel_at"):
    load_config(str(ROOT / "configs" / "paper.py"))


def test_paper_rows_match_the_paper():
  """Every row's 14 AUCs average to its printed mean (to rounding), or its
  note says where the paper disagrees with itself."""
  from configs import paper
  c = load_config(f"{ROOT / 'configs' / 'paper.py'}:table2_cwcel_at")
  assert (c.loss, c.aux_task, c.num_train_steps, c.transfer) == (
      "cw_cel", True, 9000, True)
  assert c.paper.mean_auc == 0.8325 and c.paper.auc[L.INDEX["Hernia"]] == (
      0.8728)
  nt = paper.get_config("table1_wcel_nt")
  assert (nt.transfer, nt.num_train_steps, nt.loss) == (
      False, 23000, "w_cel_faithful")
  assert paper.get_config("table2_cel_transition").model.transition_channels
  assert paper.get_config("table6_resnet50").model_name == "resnet50"
  for row in paper.ROWS:
    p = paper.get_config(row).paper
    if p.auc is None:
      continue
    assert len(p.auc) == L.NUM_DISEASES
    computed = float(np.mean(p.auc))
    if abs(computed - p.mean_auc) > 5e-4:
      assert f"average {computed:.4f}" in p.note, (row, computed, p.note)
    else:
      assert "average" not in p.note, (row, p.note)


# ------------------------------------------------------- end to end (CLI)

def _train_cmd(workdir, data, steps=12):
  return [sys.executable, "-m", "cxr_jax.cli", "train", "--config",
          str(ROOT / "configs" / "tiny.py"), "--workdir", str(workdir),
          f"--config.data_dir={data}", "--config.image_size=75",
          f"--config.num_train_steps={steps}", "--config.eval_every_steps=100",
          "--config.checkpoint_every_steps=4", "--config.log_every_steps=4",
          "--config.batch_size=8", "--config.loader_threads=1"]


def _env(compile_cache):
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  env["PYTHONPATH"] = str(ROOT)
  # The five runs below compile the same programs: JAX's persistent cache
  # lets each restart load them, as a preempted job on a cluster would. A
  # cached executable is the one compiled, so the bit-identity check holds.
  env["JAX_COMPILATION_CACHE_DIR"] = str(compile_cache)
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


@pytest.mark.slow
def test_a_preempted_run_resumes_to_the_same_parameters(tiny_data, tmp_path):
  """InceptionV3 through `cxr-jax train`: SIGTERM, resume, and the same
  parameters bit for bit as a run never stopped. (SIGKILL, repeated
  preemption and a stale lock: the soak test in test_robust_train.py, on a
  small network, since every CLI run here costs about a minute.)"""
  env = _env(tmp_path / "jax_cache")
  ref_dir = tmp_path / "uninterrupted"
  subprocess.run(_train_cmd(ref_dir, tiny_data), env=env, check=True,
                 capture_output=True, timeout=600)
  ref, ref_step = _final_params(ref_dir)
  assert ref_step == 12

  # SIGTERM after the first checkpoint: the run must save the step it is
  # on and exit 143; the next run resumes from that step.
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
  subprocess.run(_train_cmd(run, tiny_data), env=env, check=True,
                 capture_output=True, timeout=600)
  header = json.loads((run / "run_header.json").read_text())
  assert header["resumed_from_step"] == saved
  params, step = _final_params(run)
  assert step == 12
  for a, b in zip(jax.tree_util.tree_leaves(params),
                  jax.tree_util.tree_leaves(ref)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Analysis on the finished run: restore on another topology (1 device
  # here, 2 in training) and evaluate. (The demo test localizes with this
  # network; the soak test continues a finished run with more steps.)
  from cxr_jax import evaluation
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


@pytest.mark.slow
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


def test_loop_on_a_small_model_resumes_with_its_best_and_analyses(
    tiny_data, tmp_path, monkeypatch):
  """train_and_evaluate end to end in-process on a small registered model:
  validation, checkpoints, a resume whose summary keeps the best it had,
  and evaluate/localize/predict through the one inference path."""
  from cxr_jax import evaluation, localization
  monkeypatch.setitem(models.MODELS, "small_net", (SmallNet, {}))
  c = train_config(data_dir=tiny_data, model_name="small_net",
                   num_train_steps=8, eval_every_steps=4,
                   checkpoint_every_steps=4, log_every_steps=4, batch_size=8,
                   loader_threads=1, optimizer="adam", learning_rate=1e-3,
                   loss="cw_cel")
  c.model = {"dtype": "float32"}
  workdir = str(tmp_path / "run")
  first = train.train_and_evaluate(c, workdir)
  assert first["step"] == 8 and first["best_step"] in (4, 8)
  assert np.isfinite(first["best_val_mean_auc"])
  resumed = train.train_and_evaluate(c, workdir)  # nothing left to train
  assert resumed["best_step"] == first["best_step"]
  assert resumed["best_val_mean_auc"] == first["best_val_mean_auc"]
  # Continued to 12 steps, decoding in two worker processes: the resume
  # restores into the state's shapes without running the init, and ends
  # where a run never stopped, with no workers, ends.
  c.num_train_steps = 12
  never_stopped = c.copy_and_resolve_references()
  c.loader_workers = 2

  def no_init(*args):
    raise AssertionError("a resumed run initialised its variables")
  with monkeypatch.context() as m:
    m.setattr(train.Trainer, "init_state", no_init)
    assert train.train_and_evaluate(c, workdir)["step"] == 12
  train.train_and_evaluate(never_stopped, str(tmp_path / "never_stopped"))
  for a, b in zip(jax.tree_util.tree_leaves(_final_params(workdir)[0]),
                  jax.tree_util.tree_leaves(
                      _final_params(tmp_path / "never_stopped")[0])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in rows if "val_loss" in r] == [4, 8, 12]
  assert all(np.isfinite(r["val_loss"]) for r in rows if "val_loss" in r)
  ev = evaluation.evaluate(workdir, "best", "val", num_resamples=20)
  assert ev["num_images"] > 0
  loc = localization.localize(workdir, max_overlays=1)
  assert loc["boxes"] > 0
  with pytest.raises(ValueError, match="threshold"):
    localization.localize(workdir, threshold=300)


@pytest.mark.slow
def test_run_header_records_compiling_and_a_restart_reads_the_cache(
    tiny_data, tmp_path, monkeypatch):
  """A second job with the same step (a restarted or preempted one) loads
  it from the persistent cache; --config.compilation_cache=false opts
  out. run_header.json says which happened and how long it took."""
  from conftest import XLA_CACHE
  from cxr_jax import compilation
  monkeypatch.setitem(models.MODELS, "small_net", (SmallNet, {}))
  c = train_config(data_dir=tiny_data, model_name="small_net",
                   num_train_steps=1, eval_every_steps=100, batch_size=8,
                   loader_threads=1, max_eval_images=8, eval_batch_size=8,
                   compilation_cache_dir=str(tmp_path / "cache"))
  c.model = {"dtype": "float32"}
  header = lambda run: json.load(open(tmp_path / run / "run_header.json"))
  small = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  try:
    for run in ("first", "restarted"):
      train.train_and_evaluate(c, str(tmp_path / run))
    c.compilation_cache = False
    train.train_and_evaluate(c, str(tmp_path / "opted_out"))
  finally:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", small)
    compilation.configure_cache(True, XLA_CACHE)
  compiled = {run: header(run)["compile"]["train_step"]
              for run in ("first", "restarted", "opted_out")}
  assert [x["persistent_cache"] for x in compiled.values()] == [
      "miss", "hit", "not used"], compiled
  assert all(x["seconds"] > 0 for x in compiled.values())
  assert header("first")["compilation_cache_dir"] == str(tmp_path / "cache")
  assert header("opted_out")["compilation_cache_dir"] is None
  assert os.listdir(tmp_path / "cache")


def test_cosine_schedule_reaches_zero_at_the_last_step():
  c = train_config(optimizer="sgd", learning_rate=0.5, num_train_steps=4,
              lr_schedule="cosine")
  tx = optim.from_config(c)
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
    optim.from_config(train_config(lr_schedule="linear"))
