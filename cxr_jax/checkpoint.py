"""Orbax checkpoints: the latest and the best by validation mean AUC.

Each checkpoint holds three items: `state` (params, batch_stats, optimizer
state, step), `data` (the input iterator's state, JSON) and `config` (JSON).
Saving is asynchronous; `wait_until_finished()` runs before exit.
`restore(workdir, which)` is the entry point for analysis.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from cxr_jax.models import upgrade_config

METRIC = "val_mean_auc"
CHECKPOINT_DIR = "checkpoints"


def _best_metric(metrics) -> float:
  return float(metrics[METRIC])


def manager(workdir: str, read_only: bool = False) -> ocp.CheckpointManager:
  """A manager keeping the latest checkpoint and the best by val mean AUC."""
  options = ocp.CheckpointManagerOptions(
      preservation_policy=pp.AnyPreservationPolicy([
          pp.LatestN(n=1),
          pp.BestN(get_metric_fn=_best_metric, reverse=False, n=1,
                   keep_checkpoints_without_metrics=False),
      ]),
      best_fn=_best_metric, best_mode="max",
      keep_checkpoints_without_metrics=True,
      enable_async_checkpointing=not read_only, read_only=read_only,
      create=not read_only)
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR),
      item_handlers={"state": ocp.StandardCheckpointHandler(),
                     "data": ocp.JsonCheckpointHandler(),
                     "config": ocp.JsonCheckpointHandler()},
      options=options)


def save(mgr: ocp.CheckpointManager, step: int, state: Any,
         data_state: dict, config: ml_collections.ConfigDict,
         metrics: dict | None = None, force: bool = False) -> bool:
  return mgr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=ocp.args.JsonSave(data_state),
      config=ocp.args.JsonSave(json.loads(config.to_json()))),
      metrics=metrics, force=force)


def restore_state(mgr: ocp.CheckpointManager, step: int, target: Any
                  ) -> tuple[Any, dict]:
  """(state restored into `target`'s structure and shardings, data state)."""
  restored = mgr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
  return restored["state"], restored["data"]


def restore(workdir: str, which: str = "best"
            ) -> tuple[dict[str, Any], ml_collections.ConfigDict]:
  """`(variables, config)` of a run: variables = {'params', 'batch_stats'}.

  `which` is 'best' (highest validation mean AUC; the latest if no
  checkpoint has been evaluated) or 'latest'.
  """
  if which not in ("best", "latest"):
    raise ValueError(f"which must be 'best' or 'latest', got {which!r}")
  if not os.path.isdir(os.path.join(workdir, CHECKPOINT_DIR)):
    raise FileNotFoundError(f"no checkpoints in {workdir}")
  mgr = manager(workdir, read_only=True)
  step = mgr.best_step() if which == "best" else None
  step = step if step is not None else mgr.latest_step()
  if step is None:
    raise FileNotFoundError(f"no checkpoints in {workdir}")
  # The run may have used other devices than this process has: restore onto
  # one local device, from the shapes the checkpoint records.
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree_util.tree_map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
      mgr.item_metadata(step)["state"])
  restored = mgr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target), config=ocp.args.JsonRestore()))
  state = restored["state"]
  variables = {"params": state["params"],
               "batch_stats": state.get("batch_stats", {})}
  config = upgrade_config(ml_collections.ConfigDict(restored["config"]))
  config.restored_step = int(step)
  return variables, config
