"""Asymmetric loss baseline (beyond the paper; Ridnik et al. 2021).

    cxr-jax train --config configs/beyond_asl.py --workdir W \
        --config.data_dir=DATA --config.init_weights=imagenet.npz

Loss `asymmetric`, auxiliary task on, 9,000 steps; gamma+ 0, gamma- 4, clip 0.05.
Not in the paper: no reported AUC.
The paper's random 70/10/20 split (seed = trial), batch 16, Adadelta at
lr 1e-5 (literal; see configs/default.py on how little that moves).
"""

from configs import default


def get_config():
  c = default.get_config()
  c.loss = "asymmetric"
  c.aux_task = True
  c.num_train_steps = 9000
  return c
