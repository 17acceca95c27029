"""CEL(tran.), Table 2: cross-entropy with Wang et al.'s transition layer.

    cxr-jax train --config configs/table2_cel_transition.py --workdir W \
        --config.data_dir=DATA --config.init_weights=imagenet.npz

Wang et al. 2017 insert a transition layer (a convolution to S channels)
between the last feature map and the pooling, and pool with log-sum-exp.
The paper reports a mean AUC of 0.7480. `model = 'inception_v3_transition'`
selects our version of that head: a 1x1 conv to 1024 channels, BatchNorm,
ReLU, then LSE pooling (r = 10) before the 15-way head.
"""

from configs import default


def get_config():
  c = default.get_config()
  c.model = "inception_v3_transition"
  c.loss = "cross_entropy"
  c.aux_task = False
  c.num_train_steps = 23000
  return c
