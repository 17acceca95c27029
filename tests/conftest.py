"""Test set-up: 8 fake CPU devices and Keras on JAX, before anything imports jax."""

import os
import pathlib

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared"
SAMPLE = SHARED / "data" / "chestxray14_sample"


@pytest.fixture(scope="session")
def nih_sample() -> pathlib.Path:
  """The real ChestX-ray14 sample beside the checkout (CI has it; users don't)."""
  if not (SAMPLE / "Data_Entry_2017_v2020.csv.gz").exists():
    pytest.skip(f"real ChestX-ray14 sample not found at {SAMPLE}")
  return SAMPLE
