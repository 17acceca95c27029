"""Compilation: JAX's persistent cache, and the train step compiled (and
timed) before the first step.

A deep backbone's training step takes minutes to compile. With the
persistent cache on (the default, `config.compilation_cache`), a restarted
or preempted job reads the executable back instead of compiling it again.
The run records what compiling cost, and whether the cache answered, in
run_header.json.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from typing import Any, Callable

import jax
from jax.experimental.compilation_cache import compilation_cache

log = logging.getLogger(__name__)

_EVENTS = ("/jax/compilation_cache/cache_hits",
           "/jax/compilation_cache/cache_misses")
_counts = {event: 0 for event in _EVENTS}
_counts_lock = threading.Lock()
_listening = False


def _count(event: str, **_) -> None:
  if event in _counts:
    with _counts_lock:
      _counts[event] += 1


def _listen() -> None:
  global _listening
  if not _listening:
    jax.monitoring.register_event_listener(_count)
    _listening = True


def default_cache_dir() -> str:
  """JAX's own setting (JAX_COMPILATION_CACHE_DIR) if the user made one, else
  a folder of the user's cache directory."""
  if jax.config.jax_compilation_cache_dir:
    return jax.config.jax_compilation_cache_dir
  root = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
  return os.path.join(root, "cxr_jax", "jax_compilation_cache")


def configure_cache(enabled: bool, cache_dir: str = "") -> str | None:
  """Turns JAX's persistent compilation cache on (at `cache_dir`, or
  `default_cache_dir()`) or off; returns the folder in use, or None.

  Takes effect even if this process compiled something before: the cache
  decides whether it is used at its first compile, so it is reset here.
  """
  _listen()
  if not enabled:
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    return None
  path = os.path.expanduser(cache_dir) if cache_dir else default_cache_dir()
  if (jax.config.jax_enable_compilation_cache and
      jax.config.jax_compilation_cache_dir == path):
    return path
  jax.config.update("jax_enable_compilation_cache", True)
  compilation_cache.set_cache_dir(path)
  compilation_cache.reset_cache()
  log.info("persistent compilation cache: %s", path)
  return path


def cache_events() -> dict[str, int]:
  """Persistent-cache hits and misses counted since this module loaded."""
  with _counts_lock:
    return {"hits": _counts[_EVENTS[0]], "misses": _counts[_EVENTS[1]]}


@contextlib.contextmanager
def quick_compile():
  """XLA's cheapest compile (`jax_disable_most_optimizations`) inside the
  block, the previous setting after it: for programs compiled for their
  results, not their speed, such as a test's plumbing or the random draws
  that build a reference network."""
  previous = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", True)
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", previous)


def compile_ahead(jitted: Callable, *args: Any) -> dict[str, Any]:
  """Compiles `jitted` for `args` now (a later call with arguments of the
  same shapes and shardings runs the same executable, no recompilation);
  returns the seconds it took and what the persistent cache said."""
  _listen()
  before = cache_events()
  start = time.perf_counter()
  jitted.lower(*args).compile()
  seconds = time.perf_counter() - start
  after = cache_events()
  hits = after["hits"] - before["hits"]
  misses = after["misses"] - before["misses"]
  return {"seconds": round(seconds, 3),
          "persistent_cache": ("hit" if hits and not misses else
                               "miss" if misses else "not used")}
