"""What a run writes besides checkpoints: metrics.jsonl, TensorBoard events
and run_header.json, by process 0 only.

A resumed run recomputes every step after the checkpoint it resumed from,
so it first drops the records of those steps (a killed run may have logged
past its last checkpoint, and a SIGKILL can leave half a line): each step
is in metrics.jsonl once. TensorBoard is told the same through purge_step.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any

import jax

log = logging.getLogger(__name__)


def _keep_steps_up_to(path: str, step: int) -> None:
  """Rewrites `path` (atomically) without the records after `step` and
  without lines that do not parse."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()
  kept = []
  for line in lines:
    try:
      record = json.loads(line)
    except ValueError:
      continue
    if isinstance(record, dict) and isinstance(record.get("step"), int) and (
        record["step"] <= step):
      kept.append(line if line.endswith("\n") else line + "\n")
  if len(kept) == len(lines):
    return
  log.info("metrics.jsonl: dropping %d records after step %d, which this "
           "run recomputes", len(lines) - len(kept), step)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(kept)
  os.replace(tmp, path)


class TrainWindow:
  """The steps since the last log. Their metrics stay on the device until
  `close` reads them all at once: one wait per window, not one per step."""

  def __init__(self):
    self._start()

  def _start(self) -> None:
    self.metrics: list[dict] = []
    self.start = time.perf_counter()

  def append(self, metrics: dict) -> None:
    self.metrics.append(metrics)

  def close(self) -> dict[str, float]:
    """Mean finite loss, last loss and images/s of the window; starts the
    next one."""
    fetched = jax.device_get(self.metrics)
    elapsed = time.perf_counter() - self.start
    finite = [float(x["loss"]) for x in fetched
              if math.isfinite(float(x["loss"]))]
    self._start()
    return {"train_loss": sum(finite) / len(finite) if finite else math.nan,
            "last_loss": float(fetched[-1]["loss"]) if fetched else math.nan,
            "images_per_s": sum(float(x["images"]) for x in fetched) / elapsed}


class MetricLog:
  """TensorBoard events and metrics.jsonl, written by process 0 only."""

  def __init__(self, workdir: str, resume_step: int = 0):
    """`resume_step`: the step the run continues from; later records go."""
    self.workdir = workdir
    self.active = jax.process_index() == 0
    self.tb = None
    if self.active:
      os.makedirs(workdir, exist_ok=True)
      path = os.path.join(workdir, "metrics.jsonl")
      _keep_steps_up_to(path, resume_step)
      self.jsonl = open(path, "a")
      try:
        from tensorboardX import SummaryWriter
        self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"),
                                purge_step=resume_step + 1)
      except ImportError:
        log.warning("tensorboardX not installed: no TensorBoard events")

  def header(self, values: dict[str, Any]) -> None:
    """The run's facts (devices, batch sizes, parameters, splits): logged and
    written to run_header.json."""
    if not self.active:
      return
    for k, v in values.items():
      log.info("%s: %s", k, v)
    with open(os.path.join(self.workdir, "run_header.json"), "w") as f:
      json.dump(values, f, indent=2)

  def write(self, step: int, values: dict[str, float]) -> None:
    if not self.active:
      return
    self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
    self.jsonl.flush()
    if self.tb is not None:
      for k, v in values.items():
        if isinstance(v, (int, float)) and math.isfinite(v):
          self.tb.add_scalar(k, v, step)
      self.tb.flush()

  def close(self) -> None:
    if self.active:
      self.jsonl.close()
      if self.tb is not None:
        self.tb.close()

  def __enter__(self) -> "MetricLog":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
