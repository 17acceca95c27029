"""Focal loss baseline (beyond the paper; Lin et al. 2017).

    cxr-jax train --config configs/beyond_focal.py --workdir W \
        --config.data_dir=DATA --config.init_weights=imagenet.npz

Loss `focal`, auxiliary task on, 9,000 steps; alpha 0.25, gamma 2.
Not in the paper: no reported AUC.
The paper's random 70/10/20 split (seed = trial), batch 16, Adadelta at
lr 1e-5 (literal; see configs/default.py on how little that moves).
"""

from configs import default


def get_config():
  c = default.get_config()
  c.loss = "focal"
  c.aux_task = True
  c.num_train_steps = 9000
  return c
