"""MSE(S), Table 2.

    cxr-jax train --config configs/table2_mse_s.py --workdir W \
        --config.data_dir=DATA --config.init_weights=imagenet.npz

Loss `mse`, no auxiliary task, 23,000 steps; the (S) rows train 23,000 steps.
The paper reports a mean AUC of 0.6763 over the 14 diseases.
The paper's random 70/10/20 split (seed = trial), batch 16, Adadelta at
lr 1e-5 (literal; see configs/default.py on how little that moves).
"""

from configs import default


def get_config():
  c = default.get_config()
  c.loss = "mse"
  c.aux_task = False
  c.num_train_steps = 23000
  return c
