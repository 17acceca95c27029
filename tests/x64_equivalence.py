"""Run as a script (x64 must be set before JAX starts): InceptionV3's
training step on 8 devices vs 1, computed in float64. Prints JSON errors."""

import json
import os
import sys

os.environ["JAX_ENABLE_X64"] = "1"
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import test_train as T  # noqa: E402
from cxr_jax import train  # noqa: E402

batch = T._batches(n=1)
c = T._config(learning_rate=1.0, dtype="float64", depth_multiplier=1.0)
ref = T._run(c, 1, batch, model_fn=train.build_model)
got = T._run(c, 8, batch, model_fn=train.build_model)
print(json.dumps({"loss": abs(got[0][0] - ref[0][0]) / abs(ref[0][0]),
                  "batch_stats": T._rel(got[2], ref[2]),
                  "gradient": T._rel(got[1], ref[1])}))
