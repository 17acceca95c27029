"""Run as a script (x64 must be set before JAX starts): InceptionV3's
training step on 8 devices vs 1, computed in float64. Prints JSON errors."""

import json
import os
import sys

os.environ["JAX_ENABLE_X64"] = "1"
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import conftest as T  # noqa: E402
from cxr_jax import models  # noqa: E402

batch = T.random_batches(n=1)
c = T.train_config(learning_rate=1.0, model__dtype="float64",
                   model__depth_multiplier=1.0)
model_fn = lambda config, axis: models.from_config(config, axis)
# Variables drawn by numpy: compiling InceptionV3's init in float64 (a PRNG
# draw per parameter) took 27 s per topology; the step is what is compared.
variables = T.random_variables(model_fn(c, None), size=c.image_size)
ref = T.run_steps(c, 1, batch, model_fn=model_fn, variables=variables)
got = T.run_steps(c, 8, batch, model_fn=model_fn, variables=variables)
print(json.dumps({"loss": abs(got[0][0] - ref[0][0]) / abs(ref[0][0]),
                  "batch_stats": T.rel_error(got[2], ref[2]),
                  "gradient": T.rel_error(got[1], ref[1])}))
