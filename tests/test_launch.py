"""Launch scripts: valid bash, and their dry runs print the right commands."""

import os
import pathlib
import subprocess

import pytest

LAUNCH = pathlib.Path(__file__).resolve().parents[1] / "launch"


@pytest.mark.parametrize("script", sorted(p.name for p in LAUNCH.iterdir()))
def test_syntax(script):
  subprocess.run(["bash", "-n", str(LAUNCH / script)], check=True)


def _dry(*args):
  env = dict(os.environ, DRY_RUN="1")
  return subprocess.run(["bash", *map(str, args)], env=env, check=True,
                        capture_output=True, text=True).stdout


def test_dry_runs():
  out = _dry(LAUNCH / "local.sh", "configs/tiny.py", "W", "--config.seed=3")
  assert out.strip() == ("cxr-jax train --config configs/tiny.py --workdir W "
                         "--config.seed=3")
  assert "srun" in _dry(LAUNCH / "slurm.sbatch", "c.py", "W")
  assert "--worker=all" in _dry(LAUNCH / "tpu_vm.sh", "tpu", "zone", "c.py",
                                "W")
  sweep = _dry(LAUNCH / "sweep_table3.sh", "DATA", "w.npz", "ROOT").splitlines()
  assert len(sweep) == 6
  assert all(f"--config.split_seed={i}" in line for i, line in
             enumerate(sweep))
