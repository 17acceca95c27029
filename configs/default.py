"""Default DeepCXray configuration: every knob, with the paper's values.

    cxr-jax train --config configs/default.py --workdir W \
        --config.data_dir=DATA --config.init_weights=imagenet.npz

Paper: Xu et al., "DeepCXray", IEEE Access 2018. InceptionV3 from ImageNet
weights, 15 sigmoid outputs (14 diseases + the auxiliary "normal" task),
CW-CEL, Adadelta at lr 1e-5, batch 16. The experiment configs derive from this
one and change only what differs.

About the learning rate: with TensorFlow's Adadelta (rho 0.95, eps 1e-8) an
lr of 1e-5 moves a weight by only ~lr*sqrt(eps) per step (about 1e-4 in 9k
steps on a logistic regression). The paper configs keep the literal setting,
as the paper reports it; the demo (configs/tiny.py) uses one that learns.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Data
  c.data_dir = ""            # a prepared dataset (cxr-jax prepare)
  c.image_size = 299         # the prepared size to read
  c.split_scheme = "paper"   # paper | patient | official
  c.split_seed = 0           # the trial: Table 3's six trials are seeds 0-5
  c.split_dir = ""           # or a folder written by `cxr-jax splits`
  c.view = ""                # '', 'PA' or 'AP'
  c.augment_flip = False     # off, as in the paper
  c.augment_min_crop = 1.0   # < 1.0 turns on random crop/rescale
  c.loader_threads = 4
  # Model
  c.model = "inception_v3"
  c.num_outputs = 15         # 14 diseases + "normal"
  c.dropout_rate = 0.0       # Keras' InceptionV3 has none
  c.dtype = "float32"        # or 'bfloat16' (parameters stay float32)
  c.init_weights = ""        # a converted ImageNet file (cxr-jax convert-weights)
  c.transfer = True          # paper rows with transfer need init_weights; NT rows set False
  c.sync_batch_stats = True  # N devices normalise as one
  c.bn_momentum = 0.99       # Keras'; running stats lag ~1/(1-m) steps
  c.head_pooling = "avg"      # 'lse': LSE-pool the per-cell class maps (sharper CAMs)
  c.lse_r = 10.0
  c.output_stride = 32       # InceptionV3's; 16 keeps Mixed_7 at 15x15 (finer CAMs)
  c.depth_multiplier = 1.0   # TF-slim's; < 1 thins the network (no ImageNet weights fit)
  c.conv_init = "lecun_normal"  # from scratch: or 'delta' (local start; sharper CAMs)
  # Objective
  c.loss = "cw_cel"          # a key of cxr_jax.losses.LOSSES
  c.loss_kwargs = ml_collections.ConfigDict()
  c.aux_task = True          # train the 15th "normal" output too
  c.nonfinite = "skip"       # 'skip' drops the update and counts it; 'stop'
  # Optimizer (TensorFlow's Adadelta, the paper's lr)
  c.optimizer = "adadelta"
  c.learning_rate = 1e-5
  c.lr_schedule = "constant"  # as in the paper; or 'cosine' (to 0 at num_train_steps)
  c.adadelta_rho = 0.95
  c.adadelta_epsilon = 1e-8
  # Schedule
  c.batch_size = 16          # global, over all devices and hosts
  c.num_train_steps = 9000   # 23,000 for the NT and (S) rows
  c.eval_every_steps = 500
  c.eval_batch_size = 64
  c.log_every_steps = 50
  c.checkpoint_every_steps = 500
  c.max_eval_images = 0      # 0 = the whole validation split
  # Parallelism
  c.parallel = "shard_map"   # or 'pmap'; both wrap the same per-device step
  c.seed = 0
  return c
