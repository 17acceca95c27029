"""SIGTERM handling: the loop saves the current step and exits (143).

Cluster schedulers (SLURM's --signal, Cloud TPU maintenance) send SIGTERM
some time before they kill a job; the flag lets the loop finish its step,
save, and leave a run that resumes exactly.
"""

from __future__ import annotations

import signal


class Preempted(SystemExit):
  """Raised by the loop after saving, on SIGTERM."""


class NonFiniteLoss(RuntimeError):
  """A non-finite loss with config.nonfinite='stop'; names the step."""


class Preemption:
  """Sets `requested` on SIGTERM while active (a context manager)."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __enter__(self) -> "Preemption":
    self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    signal.signal(signal.SIGTERM, self._previous)
