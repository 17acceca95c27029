"""One process of the multi-process test (run as a script).

    python multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT DEVICES OUT

With NUM_PROCESSES=1 it is the single-process reference. Each process feeds
only its slice of every global batch; results go to OUT (.npz) from process 0.
"""

import os
import sys

pid, nproc, port, devices, out = (int(sys.argv[1]), int(sys.argv[2]),
                                  int(sys.argv[3]), int(sys.argv[4]),
                                  sys.argv[5])
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from cxr_jax import parallel  # noqa: E402

if nproc > 1:
  parallel.initialize_distributed(f"localhost:{port}", nproc, pid)

import conftest as T  # noqa: E402
from cxr_jax import train  # noqa: E402

config = T.train_config()
trainer = train.Trainer(config, model_fn=T.small_model)
state = trainer.init_state(jax.random.key(0))
losses = []
for batch in T.random_batches():
  share = len(batch["mask"]) // nproc
  local = {k: v[pid * share:(pid + 1) * share] for k, v in batch.items()}
  state, m = trainer.train(state, local)
  losses.append(float(m["loss"]))
params = jax.tree_util.tree_leaves(state.params)
stats = jax.tree_util.tree_leaves(state.batch_stats)
if pid == 0:
  # Replicated arrays span every process's devices: read this process's copy.
  local_copy = lambda x: np.asarray(x.addressable_data(0))
  flat = {f"param_{i}": local_copy(x) for i, x in enumerate(params)}
  flat.update({f"stats_{i}": local_copy(x) for i, x in enumerate(stats)})
  np.savez(out, losses=np.array(losses), devices=jax.device_count(), **flat)
