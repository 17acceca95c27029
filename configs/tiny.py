"""A tiny configuration that learns on CPU in seconds to minutes: the tests
and the demo use it (synthetic data at small images, from scratch).

    cxr-jax train --config configs/tiny.py --workdir W --config.data_dir=DATA

Not a paper experiment. It keeps the paper's objective (CW-CEL with the
auxiliary task) and its 299-px input, but trains from scratch with Adam at
1e-3, because Adadelta at lr 1e-5 barely moves the weights (see
default.py). The network is TF-slim's InceptionV3 at depth_multiplier 0.25:
the same layers with a quarter of the channels (1.4M parameters), which
trains faster at 299 px on a CPU than the full network does at 139 px, where
Mixed_7c is only 3x3 and CAM cannot localize.

Three choices, none of them the paper's, make its class activation maps
tight enough to box a finding of realistic size (0.2 of the film) after a
few minutes of training from scratch; benchmarks/RESULTS.md measures each:

* conv_init='delta': every convolution starts at its centre tap, so a
  Mixed_7c cell starts with a narrow effective receptive field and widens it
  only where training asks;
* head_pooling='lse': log-sum-exp pooling of the per-cell class scores does
  not reward spreading a finding's evidence over every cell that can see it,
  as a plain average does;
* output_stride=16: Mixed_7b/c run on a 15x15 grid at 299 px, so their 3x3
  mixing spans 16-px rather than 32-px steps.
"""

from configs import default


def get_config():
  c = default.get_config()
  c.image_size = 299
  c.model.depth_multiplier = 0.25
  c.model.conv_init = "delta"
  c.model.head_pooling = "lse"
  c.model.output_stride = 16
  c.model.bn_momentum = 0.9  # a short run: inference statistics must keep up
  c.transfer = False  # from scratch
  c.split_scheme = "official"
  c.optimizer = "adam"
  c.learning_rate = 1e-3
  c.batch_size = 16
  c.num_train_steps = 200
  c.eval_every_steps = 100
  c.eval_batch_size = 32
  c.log_every_steps = 10
  c.checkpoint_every_steps = 100
  c.loader_threads = 2
  return c
