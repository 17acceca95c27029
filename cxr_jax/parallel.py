"""Data parallelism: one per-device step, wrapped by shard_map (default) or pmap.

The per-device step is written once with named-axis collectives over
`AXIS` ('data'): the loss's counts are psum-med, BatchNorm statistics are
pmean-ed, gradients are summed. Two wrappers run it:

* `shard_map_step`: `jax.shard_map` inside `jax.jit` over a one-axis `Mesh`
  of every device of every process. Batches are global `jax.Array`s built
  from each process's share with `jax.make_array_from_process_local_data`.
* `pmap_step`: `jax.pmap` over the local devices; batches carry a leading
  local-device axis.

Multi-host: `initialize_distributed` calls `jax.distributed.initialize()`
before any device is touched, from flags, from the CXR_JAX_* environment, or
with no arguments (SLURM and Cloud TPU are detected by JAX).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

AXIS = "data"


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


def make_mesh(devices=None) -> Mesh:
  """A one-axis mesh over all devices (of every process)."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  return Mesh(devices.reshape(-1), (AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(AXIS))


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict:
  """This process's share of a batch -> global arrays sharded over 'data'."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in local.items()}


def shard_map_step(per_device: Callable, mesh: Mesh, out_specs,
                   donate_state: bool = True) -> Callable:
  """jit(shard_map(per_device)) with a replicated state and a data-sharded
  batch; returns a function of (state, global batch)."""
  mapped = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(AXIS)),
                         out_specs=out_specs)
  return jax.jit(mapped, donate_argnums=(0,) if donate_state else ())


def pmap_step(per_device: Callable, donate_state: bool = True) -> Callable:
  """pmap(per_device) over local devices; state and batch carry a leading
  device axis (see `replicate_pmap` and `split_for_pmap`)."""
  return jax.pmap(per_device, axis_name=AXIS,
                  donate_argnums=(0,) if donate_state else ())


def process_rows(array: jax.Array) -> np.ndarray:
  """This process's rows of an array sharded over 'data', in order."""
  shards = sorted(array.addressable_shards,
                  key=lambda s: s.index[0].start or 0)
  return np.concatenate([np.asarray(s.data) for s in shards])


def all_process_rows(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
  """Each process's rows, concatenated in process order, on every process
  (identity with one process). Evaluation gathers its predictions with it."""
  if jax.process_count() == 1:
    return arrays
  from jax.experimental import multihost_utils
  return tuple(np.concatenate(multihost_utils.process_allgather(a))
               for a in arrays)


def replicate_pmap(tree: Any) -> Any:
  """One copy per local device along a new leading axis, already placed on
  the devices (pmap, now jit(shard_map), then uses it without a transfer)."""
  devices = jax.local_devices()
  sharding = NamedSharding(Mesh(np.array(devices), ("local",)), P("local"))

  def put(x):
    x = np.asarray(x)
    return jax.device_put(np.broadcast_to(x, (len(devices),) + x.shape),
                          sharding)

  return jax.tree_util.tree_map(put, tree)


def unreplicate_pmap(tree: Any) -> Any:
  return jax.tree_util.tree_map(lambda x: x[0], tree)


def split_for_pmap(local: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """[local batch, ...] -> [local devices, per-device batch, ...]."""
  n = jax.local_device_count()

  def split(x):
    if x.shape[0] % n:
      raise ValueError(f"local batch {x.shape[0]} not divisible by {n} "
                       f"local devices")
    return x.reshape((n, x.shape[0] // n) + x.shape[1:])

  return {k: split(v) for k, v in local.items()}
