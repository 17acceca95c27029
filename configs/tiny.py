"""A tiny configuration that learns on CPU in seconds to minutes: the tests
and the demo use it (synthetic data at small images, from scratch).

    cxr-jax train --config configs/tiny.py --workdir W --config.data_dir=DATA

Not a paper experiment. It keeps the paper's objective (CW-CEL with the
auxiliary task), its 299-px input and its 8x8 Mixed_7c map for CAM, but
trains from scratch with Adam at 1e-3, because Adadelta at lr 1e-5 barely
moves the weights (see default.py). The network is TF-slim's InceptionV3 at
depth_multiplier 0.25: the same layers and strides with a quarter of the
channels (1.4M parameters), which trains faster at 299 px on a CPU than the
full network does at 139 px (measured: 14.8 against 11.9 img/s), where
Mixed_7c is only 3x3 and CAM cannot localize.
"""

from configs import default


def get_config():
  c = default.get_config()
  c.image_size = 299
  c.depth_multiplier = 0.25
  c.transfer = False  # from scratch
  c.bn_momentum = 0.9  # a short run: inference statistics must keep up
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
