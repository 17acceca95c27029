"""CW-CEL(AT, FG), Table 2.

    cxr-jax train --config configs/table2_cwcel_at_fg.py --workdir W \
        --config.data_dir=DATA --config.init_weights=imagenet.npz

Loss `cw_cel_fine_grained`, auxiliary task on, 9,000 steps; fine-grained per-class weights (eqs. 9-11), auxiliary task.
The paper reports a mean AUC of 0.8114 over the 14 diseases.
The paper's random 70/10/20 split (seed = trial), batch 16, Adadelta at
lr 1e-5 (literal; see configs/default.py on how little that moves).
"""

from configs import default


def get_config():
  c = default.get_config()
  c.loss = "cw_cel_fine_grained"
  c.aux_task = True
  c.num_train_steps = 9000
  return c
