"""What a run writes besides checkpoints: metrics.jsonl, TensorBoard events
and run_header.json, by process 0 only."""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

import jax

log = logging.getLogger(__name__)


class MetricLog:
  """TensorBoard events and metrics.jsonl, written by process 0 only."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.active = jax.process_index() == 0
    self.tb = None
    if self.active:
      os.makedirs(workdir, exist_ok=True)
      self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
      try:
        from tensorboardX import SummaryWriter
        self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
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
