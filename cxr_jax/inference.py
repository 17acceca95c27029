"""The one forward path for analysis: validation during training, `evaluate`,
`localize` and `predict` all run `Inference`.

Inference has no collectives, so it is plain `jax.jit` over arrays sharded
along the mesh's 'data' axis: the variables are replicated, every process
feeds its share of each global batch, and each process reads back its own
rows. A loss, when asked for, is computed on the global batch inside the same
call (its counts are global because the arrays are), and the batch's global
image count comes with it, so validation weights each batch correctly on any
number of hosts.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from cxr_jax import checkpoint, models, parallel
from cxr_jax import labels as L
from cxr_jax.data import pipeline

Batch = dict[str, np.ndarray]


class Inference:
  """A model jitted once over a mesh: uint8 batches in, this process's rows
  of sigmoid probabilities (all outputs) out, with the class maps of the 14
  diseases (`class_maps=True`) and the global batch loss (`loss_fn`)."""

  def __init__(self, model, mesh: Mesh | None = None,
               loss_fn: Callable | None = None, class_maps: bool = False):
    self.mesh = mesh or parallel.make_mesh()
    self.num_devices = self.mesh.size
    rows = parallel.batch_sharding(self.mesh)
    whole = parallel.replicated(self.mesh)

    def forward(variables, batch):
      x = pipeline.to_model_input(batch["image"])
      logits, out = model.apply(variables, x, train=False,
                                return_features=True)
      result = {"probs": jax.nn.sigmoid(logits)}
      if class_maps:
        result["class_maps"] = out["class_maps"][..., :L.NUM_DISEASES]
      if loss_fn is not None:
        result["loss"] = loss_fn(logits, batch["labels"], mask=batch["mask"])
        result["images"] = jnp.sum(batch["mask"])
      return result

    out_shardings = {"probs": rows}
    if class_maps:
      out_shardings["class_maps"] = rows
    if loss_fn is not None:
      out_shardings.update(loss=whole, images=whole)
    self._forward = jax.jit(forward, in_shardings=(whole, rows),
                            out_shardings=out_shardings)
    self._whole = whole

  def put(self, variables: Any) -> Any:
    """Variables replicated over the mesh (once per set of variables)."""
    return jax.device_put(variables, self._whole)

  def __call__(self, variables: Any, local: Batch) -> dict[str, Any]:
    """This process's rows of one global batch (numpy), and the batch's
    'loss' and 'images' (floats) when a loss was asked for."""
    return self.collect(self.launch(variables, local))

  def launch(self, variables: Any, local: Batch) -> dict[str, jax.Array]:
    """Places one global batch and starts its forward pass; returns at once
    (JAX dispatches asynchronously), so the host can prepare the next."""
    return self._forward(variables, parallel.global_batch(local, self.mesh))

  def collect(self, out: dict[str, jax.Array]) -> dict[str, Any]:
    """A launched batch's results on the host (waits for them)."""
    rows = {k: parallel.process_rows(out[k]) for k in ("probs", "class_maps")
            if k in out}
    if "loss" in out:
      rows["loss"] = float(out["loss"])
      rows["images"] = float(out["images"])
    return rows


def predict_batches(inference: Inference, variables: Any,
                    batches: Iterable[Batch]) -> dict[str, np.ndarray]:
  """Runs every batch and gathers every process's valid rows, in process
  order, on every process: {'probs' [N, outputs], 'labels', 'index'} (and
  'loss', the image-weighted mean batch loss, with a loss function)."""
  probs, labels, index, losses, images = [], [], [], [], []

  def keep(batch, launched):
    out = inference.collect(launched)
    rows = batch["mask"] > 0
    probs.append(out["probs"][rows])
    labels.append(batch["labels"][rows])
    index.append(batch["index"][rows])
    if "loss" in out:
      losses.append(out["loss"])
      images.append(out["images"])

  # One batch in flight: batch k+1 is read, placed and launched before batch
  # k's results are waited for, so the device never waits on the host.
  pending = None
  for batch in batches:
    launched = inference.launch(variables, batch)
    if pending is not None:
      keep(*pending)
    pending = (batch, launched)
  if pending is not None:
    keep(*pending)
  probs, labels, index = parallel.all_process_rows(
      np.concatenate(probs), np.concatenate(labels), np.concatenate(index))
  result = {"probs": probs, "labels": labels, "index": index}
  if losses:
    result["loss"] = float(np.average(losses, weights=images))
  return result


def array_batches(images: np.ndarray, batch_size: int) -> Iterator[Batch]:
  """uint8 [N, S, S, 1] films as padded batches of `batch_size` (mask 0 on
  the padding), so every call has one shape and compiles once."""
  for start in range(0, len(images), batch_size):
    chunk = images[start:start + batch_size]
    padded = np.zeros((batch_size, *images.shape[1:]), np.uint8)
    padded[:len(chunk)] = chunk
    mask = np.zeros(batch_size, np.float32)
    mask[:len(chunk)] = 1
    yield {"image": padded, "mask": mask}


class Predictor:
  """A restored run on this process's devices: films in, the 14 diseases'
  probabilities and class maps out (`predict`, `localize`)."""

  # Films per call, rounded up to a multiple of the local device count: a
  # fixed shape, so one compilation.
  CHUNK = 8

  def __init__(self, workdir: str, which: str = "best"):
    variables, self.config = checkpoint.restore(workdir, which)
    self.model = models.from_config(self.config)
    self.size = int(self.config.image_size)
    self.grid = self.model.feature_grid(self.size)
    self.step = int(self.config.restored_step)
    devices = jax.local_devices()
    self.batch_size = -(-self.CHUNK // len(devices)) * len(devices)
    self.inference = Inference(self.model, parallel.make_mesh(devices),
                               class_maps=True)
    self.variables = self.inference.put(variables)

  def __call__(self, films: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [N, S, S, 1] -> (probabilities [N, 14], class maps
    [N, h, w, 14] float32)."""
    probs, maps = [], []
    for batch in array_batches(films, self.batch_size):
      out = self.inference(self.variables, batch)
      keep = batch["mask"] > 0
      probs.append(out["probs"][keep, :L.NUM_DISEASES])
      maps.append(np.asarray(out["class_maps"][keep], np.float32))
    return np.concatenate(probs), np.concatenate(maps)
