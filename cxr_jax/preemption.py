"""What keeps a run whole: SIGTERM handling and one writer per folder.

SIGTERM: the loop saves the current step and exits (143). Cluster schedulers
(SLURM's --signal, Cloud TPU maintenance) send SIGTERM some time before they
kill a job; the flag lets the loop finish its step, save, and leave a run
that resumes exactly.

One writer: `train` (on its workdir) and `prepare` (on its --out) hold an
exclusive fcntl lock on a file in the folder while they write. A second
writer is refused with the holder's host and pid. The kernel drops the lock
when its holder dies, however it dies (SIGKILL, the OOM killer), so a lock
file naming a process that no longer holds it is stale: it is taken over,
and the log says so.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import signal
import socket
import sys
from typing import Callable

log = logging.getLogger(__name__)

LOCK_NAME = ".cxr_jax.lock"


class Preempted(SystemExit):
  """Raised by the loop after saving, on SIGTERM."""


class NonFiniteLoss(RuntimeError):
  """A non-finite loss with config.nonfinite='stop'; names the step."""


class NonfiniteWatch:
  """config.nonfinite='stop': raises NonFiniteLoss naming the first step
  whose loss, gradient or update was not finite.

  Reading a step's flag makes the host wait for that step, so `add` only
  keeps it; `check` reads every pending flag in one transfer. The loop calls
  `check` before it logs, saves or validates (big_vision checks its loss at
  log steps too): a run stops at most log_every_steps after a non-finite
  step, which changed nothing (the step keeps the old state), and that step
  never reaches a checkpoint or a log.
  """

  def __init__(self, active: bool, describe: Callable[[int, dict], str]):
    self.active, self.describe = active, describe
    self.pending: list[tuple[int, dict]] = []

  def add(self, step: int, metrics: dict) -> None:
    if self.active:
      self.pending.append((step, metrics))

  def check(self) -> None:
    if not self.pending:
      return
    import jax
    flags = jax.device_get([m["finite"] for _, m in self.pending])
    for (step, metrics), finite in zip(self.pending, flags):
      if not bool(finite):
        raise NonFiniteLoss(self.describe(step, metrics))
    self.pending.clear()


class FolderBusy(ValueError):
  """Another live process writes to the folder; names its host and pid."""


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


def _describe(holder: dict) -> str:
  return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} "
          f"({holder.get('what', '?')} started {holder.get('since', '?')}: "
          f"{holder.get('argv', '?')})")


class FolderLock:
  """An exclusive lock on `folder` while active (a context manager).

  Raises FolderBusy naming the holder when another process has it. The lock
  file stays behind, emptied on a clean exit; what a dead holder left in it
  is reported when the next writer takes the lock over.
  """

  def __init__(self, folder: str, what: str):
    self.folder = folder
    self.what = what
    self.path = os.path.join(folder, LOCK_NAME)
    self._fd: int | None = None

  def _read(self) -> dict | None:
    os.lseek(self._fd, 0, os.SEEK_SET)
    text = os.read(self._fd, 4096).decode("utf-8", "replace").strip()
    if not text:
      return None
    try:
      return json.loads(text)
    except ValueError:
      return {"argv": text[:200]}

  def __enter__(self) -> "FolderLock":
    os.makedirs(self.folder, exist_ok=True)
    self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held by another open file: another writer
      holder = self._read() or {}
      os.close(self._fd)
      self._fd = None
      raise FolderBusy(
          f"{self.folder} is in use by another {self.what}: "
          f"{_describe(holder)}; wait for it to end or use another folder "
          f"(the lock is {self.path})") from None
    stale = self._read()
    if stale:
      log.warning("%s: taking over a stale lock of %s, which ended without "
                  "releasing it (killed?)", self.folder, _describe(stale))
    me = {"host": socket.gethostname(), "pid": os.getpid(), "what": self.what,
          "since": datetime.datetime.now().isoformat(timespec="seconds"),
          "argv": " ".join(sys.argv)[:300]}
    os.ftruncate(self._fd, 0)
    os.lseek(self._fd, 0, os.SEEK_SET)
    os.write(self._fd, (json.dumps(me) + "\n").encode())
    return self

  def __exit__(self, *exc) -> None:
    if self._fd is None:
      return
    os.ftruncate(self._fd, 0)  # a clean exit leaves nothing to report
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None
