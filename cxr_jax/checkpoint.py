"""Orbax checkpoints: the latest and the best by validation mean AUC.

Each checkpoint holds three items: `state` (params, batch_stats, optimizer
state, step), `data` (the input iterator's state, JSON) and `config` (JSON).
Saving is asynchronous; `wait_until_finished()` runs before exit.
`restore(workdir, which)` is the entry point for analysis.

Resuming (`resume`) first compares the saved config with the run's: a
changed key that shapes the model, the data order or the update is refused,
naming the keys, rather than failing inside Orbax or silently continuing
another experiment. A newest step that cannot be read (a truncated or empty
folder) is named and moved to `checkpoints_unreadable/`, and the run resumes
from the step before it, saying so.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from cxr_jax.models import upgrade_config

log = logging.getLogger(__name__)

METRIC = "val_mean_auc"
CHECKPOINT_DIR = "checkpoints"
UNREADABLE_DIR = "checkpoints_unreadable"
# Config keys a resumed run may change: where the data is, how long to train
# (a finished run is extended this way), how often to log, evaluate and save,
# and how the same step is run. Any other change is another experiment.
RESUMABLE_KEYS = frozenset((
    "data_dir", "num_train_steps", "loader_threads", "loader_workers",
    "log_every_steps", "eval_every_steps", "eval_batch_size",
    "checkpoint_every_steps", "max_eval_images", "parallel", "nonfinite",
    "compilation_cache", "compilation_cache_dir"))


class CheckpointError(ValueError):
  """A checkpoint that cannot be resumed or restored; names its folder."""


def _best_metric(metrics) -> float:
  return float(metrics[METRIC])


@functools.cache  # one registration per process (after jax.distributed)
def _write_replicated_arrays_from_one_replica() -> None:
  """On CPU and TPU, Orbax by default writes a replicated array
  cooperatively, each replica a slice, and cuts every slice with an eager
  op: one dispatch per array and replica, inside the blocking part of each
  save (seconds for a network's hundreds of arrays). Sharing the writes
  helps only when the replicas sit on different hosts, so a single-process
  run writes every array from replica 0, as Orbax already does on GPUs.
  The files are the same."""
  if jax.process_count() > 1:
    return
  default = ocp.type_handlers.get_type_handler(jax.Array)
  ocp.type_handlers.register_type_handler(
      jax.Array, ocp.type_handlers.ArrayHandler(
          use_replica_parallel=False,
          # Keep the default handler's array metadata (a private field, so
          # read with a fallback: without it Orbax only skips that file).
          array_metadata_store=getattr(default, "_array_metadata_store",
                                       None)),
      override=True)


def manager(workdir: str, read_only: bool = False) -> ocp.CheckpointManager:
  """A manager keeping the latest checkpoint and the best by val mean AUC."""
  _write_replicated_arrays_from_one_replica()
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


def best_so_far(mgr: ocp.CheckpointManager) -> dict[str, Any]:
  """The best validation mean AUC and its step among the saved checkpoints
  (a resumed run continues from them rather than from -inf)."""
  step = mgr.best_step()
  recorded = mgr.metrics(step) if step is not None else None
  if not recorded or METRIC not in recorded:
    return {"auc": -math.inf, "step": None}
  return {"auc": float(recorded[METRIC]), "step": step}


def validation_metric(val: dict[str, Any]) -> dict[str, float] | None:
  """The checkpoint's metric for choosing the best; None (never the best)
  unless the validation mean AUC and loss are both finite."""
  if math.isfinite(val["mean"]) and math.isfinite(val["loss"]):
    return {METRIC: val["mean"]}
  return None


def step_dir(mgr: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(os.fspath(mgr.directory), str(step))


def _flat(tree: dict, prefix: str = "") -> dict[str, str]:
  """'a.b' -> the JSON of each leaf (JSON compares NaN equal to NaN)."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = json.dumps(v, sort_keys=True)
  return out


def config_differences(saved: dict, config: ml_collections.ConfigDict
                       ) -> list[str]:
  """'key: saved -> now' for each key that differs, except RESUMABLE_KEYS.

  Top-level keys the saved config lacks (added to the code since) are not
  compared; `model.*` keys are, both ways, since each shapes the network.
  """
  old = _flat(upgrade_config(ml_collections.ConfigDict(saved)).to_dict())
  new = _flat(json.loads(config.to_json()))
  differ = []
  for key in sorted(set(old) | set(new)):
    if key in RESUMABLE_KEYS or old.get(key) == new.get(key):
      continue
    if key not in old and not key.startswith("model."):
      continue
    differ.append(f"{key}: {old.get(key, '(unset)')} -> "
                  f"{new.get(key, '(unset)')}")
  return differ


def _why(error: Exception) -> str:
  """An error's type and first line: Orbax's messages run to many lines."""
  first = (str(error).strip().splitlines() or [""])[0][:300]
  return f"{type(error).__name__}: {first}"


def _set_aside(mgr: ocp.CheckpointManager, step: int) -> str:
  """Moves an unreadable step out of the manager's folder (it would block
  saving that step again) to UNREADABLE_DIR beside it; returns where."""
  root = os.path.join(os.path.dirname(os.fspath(mgr.directory)),
                      UNREADABLE_DIR)
  os.makedirs(root, exist_ok=True)
  dest, n = os.path.join(root, str(step)), 1
  while os.path.exists(dest):
    n += 1
    dest = os.path.join(root, f"{step}_{n}")
  shutil.move(step_dir(mgr, step), dest)
  mgr.reload()
  return dest


def resume(mgr: ocp.CheckpointManager, target: Any,
           config: ml_collections.ConfigDict, move_unreadable: bool = True
           ) -> tuple[int, Any, dict | None]:
  """(step, state, data state) to continue from; (0, target, None) without
  checkpoints.

  Reads the newest step that can be read; newer ones that cannot are logged
  and, if `move_unreadable`, moved aside. Raises CheckpointError naming the
  differing keys when the config changed, or every folder when no step can
  be read (then nothing is moved).
  """
  unreadable = []
  for step in sorted(mgr.all_steps(), reverse=True):
    try:
      saved = mgr.restore(step, args=ocp.args.Composite(
          config=ocp.args.JsonRestore()))["config"]
    except Exception as e:  # Orbax raises many kinds of errors
      unreadable.append((step, e))
      continue
    differ = config_differences(saved, config)
    if differ:
      raise CheckpointError(
          f"cannot resume from {step_dir(mgr, step)}: the config differs from "
          f"the one it was saved with ({'; '.join(differ)}); restore those "
          f"values or train in a new --workdir")
    try:
      state, data = restore_state(mgr, step, target)
    except Exception as e:
      unreadable.append((step, e))
      continue
    for bad, error in unreadable:
      folder = step_dir(mgr, bad)
      moved = f"; moved it to {_set_aside(mgr, bad)}" if move_unreadable else ""
      log.warning("checkpoint %s is unreadable (%s): resuming from step %d "
                  "instead%s", folder, _why(error), step, moved)
    return step, state, data
  if unreadable:
    named = "; ".join(f"{step_dir(mgr, step)} is unreadable ({_why(e)})"
                      for step, e in unreadable)
    raise CheckpointError(
        f"cannot resume: {named}; move "
        f"{'it' if len(unreadable) == 1 else 'them'} away to start over")
  return 0, target, None


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
  try:
    target = jax.tree_util.tree_map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
        mgr.item_metadata(step)["state"])
    restored = mgr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target),
        config=ocp.args.JsonRestore()))
  except Exception as e:  # Orbax raises many kinds of errors
    raise CheckpointError(f"cannot read checkpoint {step_dir(mgr, step)}: "
                          f"{type(e).__name__}: {e}") from None
  state = restored["state"]
  variables = {"params": state["params"],
               "batch_stats": state.get("batch_stats", {})}
  config = upgrade_config(ml_collections.ConfigDict(restored["config"]))
  config.restored_step = int(step)
  return variables, config
