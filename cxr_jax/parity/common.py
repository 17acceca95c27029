"""Error measures, our side of every parity check, and the torch driver.

torch is imported inside the functions, so this module imports without it.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np

from cxr_jax import models, weights

log = logging.getLogger(__name__)


def relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
  """||ours - reference|| / ||reference|| in float64."""
  ours, reference = np.asarray(ours, np.float64), np.asarray(reference,
                                                             np.float64)
  return float(np.linalg.norm(ours - reference) / np.linalg.norm(reference))


def max_abs_error(ours: np.ndarray, reference: np.ndarray) -> float:
  """max |ours - reference| in float64: the issue's bar is 1e-4 on logits."""
  return float(np.max(np.abs(np.asarray(ours, np.float64) -
                             np.asarray(reference, np.float64))))


# The module is static (Flax modules are frozen, hashable dataclasses), so
# jit's cache serves every call with an equal model and the same input shape:
# a parity check compares several layouts or sources at one size, and each
# would otherwise recompile the whole backbone.
@functools.partial(jax.jit, static_argnums=0)
def _inference(model: nn.Module, variables: Any, x: jax.Array):
  logits, out = model.apply(variables, x, train=False, return_features=True)
  return logits, out["feature_map"]


def flax_outputs(model_name: str, variables: Any, x: np.ndarray,
                 **model_kwargs) -> tuple[np.ndarray, np.ndarray]:
  """(logits, the map the head reads) of our model in inference mode."""
  num_classes = variables["params"]["head"]["bias"].shape[0]
  model = models.build(model_name, num_classes=num_classes, **model_kwargs)
  logits, feature_map = _inference(model, variables, x)
  return np.asarray(logits), np.asarray(feature_map)


def torch_available(what: str) -> bool:
  """Whether torch imports; if not, logs that `what` is not run."""
  try:
    import torch  # noqa: F401
  except ImportError:
    log.warning("torch is not installed: %s not run", what)
    return False
  return True


def parameter_count(net) -> int:
  """What upstreams publish as a model's size: its torch parameters, not
  its buffers (BatchNorm statistics)."""
  return sum(p.numel() for p in net.parameters())


def randomize_batch_norm(net, seed: int) -> None:
  """Random gamma ~ U(0.5, 1.5), beta ~ N(0, 0.2), running mean ~ N(0, 0.2)
  and variance ~ U(0.5, 2) for every BatchNorm2d of a torch `net`: left at
  0/1 they would hide a swapped mean and variance."""
  import torch
  rng = np.random.default_rng(seed)
  draw = lambda values: torch.from_numpy(values.astype(np.float32))
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        n = m.num_features
        m.weight.copy_(draw(rng.uniform(0.5, 1.5, n)))
        m.bias.copy_(draw(rng.normal(0.0, 0.2, n)))
        m.running_mean.copy_(draw(rng.normal(0.0, 0.2, n)))
        m.running_var.copy_(draw(rng.uniform(0.5, 2.0, n)))


def random_torch_reference(build: Callable[[], Any], seed: int,
                           randomize: Callable[[Any, int], None]
                           = randomize_batch_norm):
  """`build()` with torch seeded by `seed`, then `randomize(net, seed)`, in
  eval mode: a reference whose every number the seed fixes."""
  import torch
  torch.manual_seed(seed)
  net = build()
  randomize(net, seed)
  return net.eval()


def torch_parity(model: str, source: str,
                 build_reference: Callable[..., Any],
                 torch_outputs: Callable[[Any, np.ndarray],
                                         tuple[np.ndarray, np.ndarray]],
                 sizes=(299, 224), batch: int = 2, seed: int = 0,
                 input_size: Callable[[int], int] = lambda size: size
                 ) -> dict[str, float]:
  """Saves `build_reference(seed=seed)` (a random torch reference in eval
  mode)
  as a .pth, converts it with `weights.convert(model, source, ...)` and the
  converted-file round trip, and compares logits and maps at every size:
  {'<source>@<size>/<logits|feature_map>': max abs error}.

  `torch_outputs(net, x)` gives the reference's (logits, NHWC map) for our
  [-1, 1] NHWC input. `input_size` maps a requested size to one the
  reference computes; the key names the size checked.
  """
  import torch
  net = build_reference(seed=seed)
  with tempfile.TemporaryDirectory() as tmp:
    pth = os.path.join(tmp, f"{model}.pth")
    torch.save(net.state_dict(), pth)
    npz = os.path.join(tmp, f"{model}.npz")
    weights.convert(model, source, pth, npz)
    variables = weights.load_pretrained(npz)
    name, kwargs = weights.architecture(npz)
  rng = np.random.default_rng(seed + 1)
  errors = {}
  for size in sizes:
    size = input_size(size)
    x = rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
    t_logits, t_map = torch_outputs(net, x)
    f_logits, f_map = flax_outputs(name, variables, x, **kwargs)
    errors[f"{source}@{size}/logits"] = max_abs_error(f_logits, t_logits)
    errors[f"{source}@{size}/feature_map"] = max_abs_error(f_map, t_map)
  return errors
