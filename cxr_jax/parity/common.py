"""Error measures and our side of every parity check."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from cxr_jax import models


def relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
  """||ours - reference|| / ||reference|| in float64."""
  ours, reference = np.asarray(ours, np.float64), np.asarray(reference,
                                                             np.float64)
  return float(np.linalg.norm(ours - reference) / np.linalg.norm(reference))


def max_abs_error(ours: np.ndarray, reference: np.ndarray) -> float:
  """max |ours - reference| in float64: the issue's bar is 1e-4 on logits."""
  return float(np.max(np.abs(np.asarray(ours, np.float64) -
                             np.asarray(reference, np.float64))))


def flax_outputs(model_name: str, variables: Any, x: np.ndarray,
                 **model_kwargs) -> tuple[np.ndarray, np.ndarray]:
  """(logits, the map the head reads) of our model in inference mode."""
  num_classes = variables["params"]["head"]["bias"].shape[0]
  model = models.build(model_name, num_classes=num_classes, **model_kwargs)
  fn = jax.jit(lambda v, x: model.apply(v, x, train=False,
                                        return_features=True))
  logits, out = fn(variables, x)
  return np.asarray(logits), np.asarray(out["feature_map"])
