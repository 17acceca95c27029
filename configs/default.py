"""Default DeepCXray configuration: every knob, with the paper's values.

    cxr-jax train --config configs/default.py --workdir W \
        --config.data_dir=DATA --config.init_weights=imagenet.npz

Paper: Xu et al., "DeepCXray", IEEE Access 2018. InceptionV3 from ImageNet
weights, 15 sigmoid outputs (14 diseases + the auxiliary "normal" task),
CW-CEL, Adadelta at lr 1e-5, batch 16. The experiment configs derive from this
one and change only what differs: `configs/paper.py` holds the paper's
experiments as rows, `configs/tiny.py` the demo's.

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
  # Worker processes that decode beside the threads (0: none). One process's
  # threads share Python's lock for the work that holds it; a host feeding
  # several accelerators may need more. The batches are the same either way.
  c.loader_workers = 0
  # Model: `model_name` picks the backbone (cxr_jax.models.MODELS) and
  # `model` holds its keyword arguments (big_vision's way). Family options
  # (InceptionV3's output_stride, depth_multiplier, conv_init,
  # transition_channels; ResNet's variant, ...) are added where they differ
  # from the family's default, e.g. --config.model.output_stride=16.
  # Converted ImageNet weights add the architecture facts they imply
  # (variant, input_norm, ...), so the run's checkpoint rebuilds the model.
  c.model_name = "inception_v3"
  c.model = ml_collections.ConfigDict()
  c.model.dtype = "float32"    # or 'bfloat16' (parameters stay float32)
  c.model.dropout_rate = 0.0   # Keras' InceptionV3 has none
  c.model.bn_momentum = 0.99   # Keras'; running stats lag ~1/(1-m) steps
  c.model.head_pooling = "avg"  # 'lse': LSE-pool the per-cell class maps
  c.model.lse_r = 10.0         # LSE sharpness (head_pooling='lse', transition)
  c.num_outputs = 15         # 14 diseases + "normal"
  c.init_weights = ""        # a converted ImageNet file (cxr-jax convert-weights)
  c.transfer = True          # paper rows with transfer need init_weights; NT rows set False
  c.sync_batch_stats = True  # N devices normalise as one
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
  # JAX's persistent compilation cache, so a restarted or preempted job
  # reads its compiled step back instead of compiling it again (minutes for
  # a deep backbone). '' = JAX_COMPILATION_CACHE_DIR if set, else
  # ~/.cache/cxr_jax/jax_compilation_cache; --config.compilation_cache=false
  # turns it off.
  c.compilation_cache = True
  c.compilation_cache_dir = ""
  c.seed = 0
  return c
