"""Data parallelism: the one place where shard_map and pmap differ.

The per-device step is written once (`cxr_jax.train.train_step`) with
named-axis collectives over `AXIS` ('data'). A back-end knows how to place
the state and a batch and how to wrap that step:

* `ShardMap` (default): `jax.shard_map` inside `jax.jit` over a one-axis mesh
  of every device of every process (`jax.make_mesh`). Batches are global
  `jax.Array`s built from each process's share with
  `jax.make_array_from_process_local_data`.
* `Pmap`: `jax.pmap` over the local devices with `in_axes=(None, 0)` and
  unmapped outputs (flax's imagenet example at HEAD): the state stays one
  logical copy, so there is no replicate/unreplicate plumbing, and metrics
  come back as scalars.

Both return the state and the metrics replicated over all devices, so the
loop, the checkpoints and the analysis never ask which back-end ran.

Inference needs no collectives: `cxr_jax.inference` runs plain `jit` on
arrays sharded with `batch_sharding`.

Multi-host: `initialize_distributed` calls `jax.distributed.initialize()`
before any device is touched, from flags, from the CXR_JAX_* environment, or
with no arguments (SLURM and Cloud TPU are detected by JAX).
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

AXIS = "data"
BACKENDS = ("shard_map", "pmap")


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None,
                           auto: bool = False) -> None:
  """Starts the multi-process runtime, once, before any device is used.

  Explicit arguments win; then CXR_JAX_COORDINATOR / CXR_JAX_NUM_PROCESSES /
  CXR_JAX_PROCESS_ID; with `auto`, JAX's own cluster detection (SLURM, Cloud
  TPU). Single-process runs call nothing. On CPU the collectives use gloo.
  """
  env = os.environ
  coordinator_address = coordinator_address or env.get("CXR_JAX_COORDINATOR")
  if num_processes is None and env.get("CXR_JAX_NUM_PROCESSES"):
    num_processes = int(env["CXR_JAX_NUM_PROCESSES"])
  if process_id is None and env.get("CXR_JAX_PROCESS_ID"):
    process_id = int(env["CXR_JAX_PROCESS_ID"])
  explicit = coordinator_address is not None
  if not explicit and not auto:
    return
  if (jax.config.values.get("jax_platforms") or "").startswith("cpu") or \
      os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if explicit:
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  else:
    jax.distributed.initialize()
  log.info("process %d of %d, %d local of %d devices", jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A one-axis mesh over `devices` (default: all devices of every process).

  Auto axes: the steps place every collective themselves (shard_map), and
  inference lets jit propagate the batch sharding.
  """
  devices = list(jax.devices() if devices is None else devices)
  return jax.make_mesh((len(devices),), (AXIS,), axis_types=(AxisType.Auto,),
                       devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(AXIS))


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict:
  """This process's share of a batch -> global arrays sharded over 'data'."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in local.items()}


def process_rows(array: jax.Array) -> np.ndarray:
  """This process's rows of an array sharded over 'data', in order."""
  shards = sorted(array.addressable_shards,
                  key=lambda s: s.index[0].start or 0)
  return np.concatenate([np.asarray(s.data) for s in shards])


def all_process_rows(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
  """Each process's rows, concatenated in process order, on every process
  (identity with one process)."""
  if jax.process_count() == 1:
    return arrays
  return tuple(np.concatenate(multihost_utils.process_allgather(a))
               for a in arrays)


def mesh_context(mesh: Mesh):
  """`jax.set_mesh(mesh)` as a context where this JAX has it."""
  if hasattr(jax, "set_mesh"):
    return jax.set_mesh(mesh)
  return contextlib.nullcontext()


class ShardMap:
  """jit(shard_map(step)) over a mesh of all devices (of every process)."""

  name = "shard_map"

  def __init__(self, devices: Sequence[jax.Device] | None = None):
    self.mesh = make_mesh(devices)
    self.num_devices = self.mesh.size

  def state_sharding(self) -> jax.sharding.Sharding:
    return replicated(self.mesh)

  def put_state(self, state: Any) -> Any:
    return jax.device_put(state, self.state_sharding())

  def put_batch(self, local: dict[str, np.ndarray]) -> dict:
    return global_batch(local, self.mesh)

  def wrap_step(self, per_device: Callable, donate_state: bool = True
                ) -> Callable:
    mapped = jax.shard_map(per_device, mesh=self.mesh,
                           in_specs=(P(), P(AXIS)), out_specs=(P(), P()))
    return jax.jit(mapped, donate_argnums=(0,) if donate_state else ())


class Pmap:
  """pmap(step, in_axes=(None, 0)) over this process's devices."""

  name = "pmap"

  def __init__(self, devices: Sequence[jax.Device] | None = None):
    local = jax.local_devices()
    if devices is not None and list(devices) != local[:len(devices)] or (
        devices is not None and len(devices) != len(local)):
      raise ValueError("config.parallel='pmap' runs on all local devices; "
                       "choose 'shard_map' to use a subset")
    self.devices = local
    self.num_devices = jax.device_count()
    # The state lives replicated on the local devices, as pmap's unmapped
    # outputs leave it, so the first step needs no transfer.
    self.mesh = make_mesh(local) if jax.process_count() == 1 else None

  def state_sharding(self) -> jax.sharding.Sharding:
    if self.mesh is None:
      # Several processes: each keeps its own copy where jit leaves a fresh
      # state, on its first local device.
      return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return replicated(self.mesh)

  def put_state(self, state: Any) -> Any:
    if self.mesh is None:
      return state
    return jax.device_put(state, self.state_sharding())

  def put_batch(self, local: dict[str, np.ndarray]) -> dict:
    """[local batch, ...] -> [local devices, per-device batch, ...]."""
    n = len(self.devices)

    def split(x):
      if x.shape[0] % n:
        raise ValueError(f"local batch {x.shape[0]} not divisible by {n} "
                         f"local devices")
      return x.reshape((n, x.shape[0] // n) + x.shape[1:])

    return {k: split(v) for k, v in local.items()}

  def wrap_step(self, per_device: Callable, donate_state: bool = True
                ) -> Callable:
    return jax.pmap(per_device, axis_name=AXIS, in_axes=(None, 0),
                    out_axes=(None, None), devices=self.devices,
                    donate_argnums=(0,) if donate_state else ())


def make_backend(name: str, devices: Sequence[jax.Device] | None = None):
  """The back-end `name` ('shard_map' or 'pmap', config.parallel)."""
  if name == "shard_map":
    return ShardMap(devices)
  if name == "pmap":
    return Pmap(devices)
  raise ValueError(f"config.parallel must be one of {BACKENDS}, got {name!r}")
