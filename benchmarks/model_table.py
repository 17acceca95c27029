"""Parameters and GMACs of every backbone, against the published figures.

GMACs are XLA's cost analysis of the jitted inference forward pass (batch 1,
float32, 1000 classes so the figures compare with the papers' and
torchvision's tables): flops / 2. Parameters are the trainable ones
(BatchNorm moving statistics excluded), as torchvision and the papers count
them. Our VGG pools its last convolutional map globally (no fc6/fc7), so its
count differs from the published one by the classifier's 119.5M parameters.

    python benchmarks/model_table.py [--size 224] [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

from cxr_jax import models

# Published (parameters in millions, GMACs at 224 px unless noted): the
# torchvision model tables, and the Inception papers (Szegedy et al. 2016).
PUBLISHED = {
    "resnet50": (25.6, 4.1), "resnet101": (44.5, 7.8),
    "resnet152": (60.2, 11.5), "vgg16": (138.4, 15.5),
    "vgg19": (143.7, 19.6), "densenet121": (8.0, 2.9),
    "densenet169": (14.1, 3.4), "densenet201": (20.0, 4.3),
    "inception_v3": (23.8, 5.7),  # Keras (no aux branch; torchvision: 27.2M)
    "inception_v4": (42.7, 12.3),  # 299 px
    "inception_resnet_v2": (55.8, 13.2),  # 299 px
    "bn_inception": (11.3, 2.0),
}
AT_299 = ("inception_v3", "inception_v4", "inception_resnet_v2")


def cost(name: str, size: int) -> tuple[int, float]:
  model = models.build(name, num_classes=1000,
                       **models.cost_analysis_options(name))
  x = jnp.zeros((1, size, size, 3))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
  params = models.count_parameters(variables["params"])
  compiled = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(
      variables, x).compile()
  analysis = compiled.cost_analysis()
  if isinstance(analysis, list):  # older JAX: one dict per computation
    analysis = analysis[0]
  return params, float(analysis["flops"]) / 2e9


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--size", type=int, default=224)
  parser.add_argument("--models", nargs="+", default=sorted(models.MODELS))
  parser.add_argument("--json")
  args = parser.parse_args()
  rows = []
  print(f"{'model':22s} {'size':>4s} {'params M':>9s} {'published':>9s} "
        f"{'GMAC':>7s} {'published':>9s}")
  for name in args.models:
    size = 299 if name in AT_299 else args.size
    params, gmacs = cost(name, size)
    pub_params, pub_gmacs = PUBLISHED.get(name, (float("nan"),) * 2)
    rows.append({"model": name, "size": size, "params_m": params / 1e6,
                 "published_params_m": pub_params, "gmacs": gmacs,
                 "published_gmacs": pub_gmacs})
    print(f"{name:22s} {size:4d} {params / 1e6:9.2f} {pub_params:9.1f} "
          f"{gmacs:7.2f} {pub_gmacs:9.1f}", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"device": str(jax.devices()[0].device_kind), "jax":
                 jax.__version__, "rows": rows}, f, indent=2)


if __name__ == "__main__":
  main()
