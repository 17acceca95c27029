"""Launch scripts: valid bash, and their dry runs print the exact commands."""

import os
import pathlib
import subprocess

import pytest

LAUNCH = pathlib.Path(__file__).resolve().parents[1] / "launch"
ROW = "configs/paper.py:table2_cwcel_at"


@pytest.mark.parametrize("script", sorted(p.name for p in LAUNCH.iterdir()))
def test_syntax(script):
  subprocess.run(["bash", "-n", str(LAUNCH / script)], check=True)


def _dry(*args, **env):
  env = dict(os.environ, DRY_RUN="1", **env)
  return subprocess.run(["bash", *map(str, args)], env=env, check=True,
                        capture_output=True, text=True).stdout.strip()


def test_local():
  assert _dry(LAUNCH / "local.sh", ROW, "W", "--config.seed=3") == (
      f"cxr-jax train --config {ROW} --workdir W --config.seed=3")


def test_slurm_runs_one_distributed_process_per_node():
  assert _dry(LAUNCH / "slurm.sbatch", ROW, "W", "--config.seed=1",
              VENV="/v") == (
      f"srun /v/bin/cxr-jax train --distributed_auto --config {ROW} "
      f"--workdir W --config.seed=1")


def test_tpu_vm_runs_on_every_worker():
  assert _dry(LAUNCH / "tpu_vm.sh", "tpu", "zone", ROW, "W") == (
      "gcloud compute tpus tpu-vm ssh tpu --zone zone --worker=all --command "
      f"cd ~/cxr_jax && cxr-jax train --distributed_auto --config {ROW} "
      "--workdir W")


def test_table3_sweep_is_six_trials_of_cw_cel_at():
  sweep = _dry(LAUNCH / "sweep_table3.sh", "DATA", "w.npz", "ROOT",
               "--config.seed=2").splitlines()
  assert len(sweep) == 6
  for trial, line in enumerate(sweep):
    words = line.split()
    assert words[0].endswith("launch/local.sh")
    assert words[1].endswith("launch/../configs/paper.py:table2_cwcel_at")
    assert words[2:] == [f"ROOT/trial_{trial}", "--config.data_dir=DATA",
                         "--config.init_weights=w.npz",
                         "--config.split_scheme=paper",
                         f"--config.split_seed={trial}", "--config.seed=2"]


def test_missing_arguments_fail_with_usage():
  out = subprocess.run(["bash", str(LAUNCH / "local.sh")], capture_output=True,
                       text=True)
  assert out.returncode != 0 and "usage: local.sh" in out.stderr
