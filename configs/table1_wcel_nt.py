"""W-CEL(NT), Table 1.

    cxr-jax train --config configs/table1_wcel_nt.py --workdir W \
        --config.data_dir=DATA

Loss `w_cel_faithful`, no auxiliary task, 23,000 steps; no transfer; the faithful W-CEL, whose NaN batches the paper reports (nonfinite='skip' counts them).
The paper reports a mean AUC of 0.6877 over the 14 diseases.
The paper's random 70/10/20 split (seed = trial), batch 16, Adadelta at
lr 1e-5 (literal; see configs/default.py on how little that moves).
"""

from configs import default


def get_config():
  c = default.get_config()
  c.loss = "w_cel_faithful"
  c.aux_task = False
  c.num_train_steps = 23000
  c.transfer = False  # NT: trained from scratch
  return c
