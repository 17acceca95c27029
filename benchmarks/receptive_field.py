"""Effective receptive field of a run's class activation maps.

For the centre cell of the model's class maps, the gradient of its class
score (the CAM value) with respect to the input, in absolute value and summed over
channels, averaged over test films and classes (Luo et al. 2016). Reported:
the radius around the cell's receptive-field centre holding 50% and 80% of
that gradient mass, and its standard deviation along x and y. A CAM is about
the finding blurred by this field, which is why it sizes CAM boxes.

    python benchmarks/receptive_field.py --workdir W [--which best] [--init]

`--init` measures the same configuration freshly initialised (no training).
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from cxr_jax import checkpoint, models
from cxr_jax.data import pipeline

CLASSES = (0, 2, 3, 4)  # Atelectasis, Effusion, Infiltration, Mass


def mass_radius(mass: np.ndarray, centre: float, fraction: float = 0.5
                ) -> float:
  """Radius (px) around the pixel point (centre, centre) that holds
  `fraction` of a non-negative [size, size] map's mass. On a cell's
  input-gradient magnitude it measures the cell's effective receptive field
  (Luo et al. 2016), which sizes its CAM blobs."""
  size = mass.shape[0]
  yy, xx = np.mgrid[0:size, 0:size] + 0.5
  radius = np.hypot(xx - centre, yy - centre).ravel()
  order = np.argsort(radius)
  cumulative = np.cumsum(mass.ravel()[order]) / mass.sum()
  return float(radius[order][np.searchsorted(cumulative, fraction)])


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--which", default="best")
  parser.add_argument("--init", action="store_true")
  parser.add_argument("--films", type=int, default=40)
  args = parser.parse_args()
  variables, config = checkpoint.restore(args.workdir, args.which)
  dataset = pipeline.PreparedDataset(config.data_dir, config.image_size)
  model = models.from_config(config)
  size = dataset.image_size
  if args.init:
    variables = model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)))
  cells, offset, stride = model.feature_grid(size)
  centre_cell = cells // 2

  def cell_score(x, cls):
    maps = model.apply(variables, x, train=False,
                       return_features=True)[1]["class_maps"]
    return maps[0, centre_cell, centre_cell, cls]

  grad = jax.jit(jax.grad(cell_score), static_argnums=1)
  mass = np.zeros((size, size))
  step = max(1, len(dataset) // args.films)
  films = range(0, len(dataset), step)[:args.films]
  for i in films:
    image = np.asarray(dataset.record(i)["image"], np.uint8)[None]
    x = pipeline.to_model_input(jnp.asarray(image))
    for cls in CLASSES:
      mass += np.abs(np.asarray(grad(x, cls))[0]).sum(-1)
  mass /= mass.sum()
  centre = offset + stride * centre_cell
  yy, xx = np.mgrid[0:size, 0:size] + 0.5
  result = {
      "workdir": args.workdir, "which": "init" if args.init else args.which,
      "image_size": size, "cell_centre_px": centre,
      "r50_px": mass_radius(mass, centre, 0.5),
      "r80_px": mass_radius(mass, centre, 0.8),
      "sigma_x_px": float(np.sqrt((mass * (xx - centre) ** 2).sum())),
      "sigma_y_px": float(np.sqrt((mass * (yy - centre) ** 2).sum())),
      "films": len(films),
      "device": str(jax.devices()[0].device_kind)}
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  main()
