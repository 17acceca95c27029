"""Training: `train_and_evaluate(config, workdir)` and its pure steps.

`train_step(state, batch)` and `eval_step(state, batch)` are written once,
per device, with named-axis collectives over 'data' (see cxr_jax.parallel);
static choices are bound with functools.partial. The same functions run on
one device (axis_name=None), under shard_map, or under pmap.

Gradient semantics: each device differentiates the *global* loss divided by
the number of devices and the gradients are psum-med. Through the loss's
psum-med counts and BatchNorm's pmean-ed statistics, the collectives'
transposes route every cross-device term, so N devices compute exactly the
gradient of the one-device loss on the global batch (tests/test_train.py).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state

from cxr_jax import labels as L
from cxr_jax import losses, metrics, optim, parallel, weights
from cxr_jax.data import pipeline
from cxr_jax.models import InceptionV3, count_parameters

log = logging.getLogger(__name__)

TRANSITION_CHANNELS = 1024


class TrainState(train_state.TrainState):
  batch_stats: Any
  nonfinite_steps: jax.Array


# --------------------------------------------------------------------------
# Model and state
# --------------------------------------------------------------------------

def build_model(config, axis_name: str | None = None) -> InceptionV3:
  """The configured InceptionV3; BatchNorm syncs over `axis_name` in training."""
  if config.model not in ("inception_v3", "inception_v3_transition"):
    raise ValueError(f"unknown model {config.model!r}")
  kwargs = weights.model_kwargs(config.init_weights) if config.init_weights \
      else {}
  depth_multiplier = config.get("depth_multiplier", 1.0)
  if config.init_weights and depth_multiplier != 1.0:
    raise ValueError(
        f"config.depth_multiplier={depth_multiplier} thins the network, so the "
        f"ImageNet weights of config.init_weights={config.init_weights!r} "
        f"cannot fit it; use 1.0 or train from scratch")
  return InceptionV3(
      num_classes=config.num_outputs, dropout_rate=config.dropout_rate,
      dtype=jnp.dtype(config.dtype),
      bn_axis_name=axis_name if config.sync_batch_stats else None,
      bn_momentum=config.bn_momentum, depth_multiplier=depth_multiplier,
      head_pooling=config.get("head_pooling", "avg"),
      lse_r=config.get("lse_r", 10.0),
      output_stride=config.get("output_stride", 32),
      conv_init=config.get("conv_init", "lecun_normal"),
      transition_channels=(TRANSITION_CHANNELS
                           if config.model == "inception_v3_transition" else 0),
      **kwargs)


def learning_rate_schedule(config):
  """'constant' (the paper) or 'cosine': decays to zero at num_train_steps,
  so that a short run ends on settled weights rather than mid-stride."""
  schedule = config.get("lr_schedule", "constant")
  if schedule == "constant":
    return config.learning_rate
  if schedule == "cosine":
    return optax.cosine_decay_schedule(config.learning_rate,
                                       config.num_train_steps)
  raise ValueError(f"config.lr_schedule must be 'constant' or 'cosine', got "
                   f"{schedule!r}")


def build_optimizer(config) -> optax.GradientTransformation:
  lr = learning_rate_schedule(config)
  if config.optimizer == "adadelta":
    return optim.adadelta(lr, rho=config.adadelta_rho,
                          epsilon=config.adadelta_epsilon)
  return optim.build_optimizer(config.optimizer, lr)


def create_train_state(config, model: InceptionV3, rng) -> TrainState:
  """Fresh variables, or converted ImageNet weights with a fresh head."""
  x = jnp.zeros((1, config.image_size, config.image_size, 3))
  variables = jax.jit(functools.partial(model.init, train=False))(rng, x)
  if config.init_weights:
    variables = weights.merge_pretrained(
        variables, weights.load_pretrained(config.init_weights),
        dont_load=[r"^params/head/", r"/transition/"])
    variables = jax.tree_util.tree_map(jnp.asarray, variables)
  elif config.transfer:
    raise ValueError("this experiment trains from ImageNet weights: set "
                     "--config.init_weights=FILE (cxr-jax convert-weights), "
                     "or --config.transfer=false to train from scratch (NT)")
  return TrainState.create(
      apply_fn=model.apply, params=variables["params"],
      batch_stats=variables["batch_stats"], tx=build_optimizer(config),
      nonfinite_steps=jnp.zeros((), jnp.int32))


# --------------------------------------------------------------------------
# The pure steps (per device)
# --------------------------------------------------------------------------

def _tree_all_finite(tree) -> jax.Array:
  leaves = jax.tree_util.tree_leaves(tree)
  return jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in leaves]))


def train_step(state: TrainState, batch, *, model: InceptionV3,
               loss_fn: Callable, axis_name: str | None = None,
               num_devices: int = 1, dropout_seed: int = 0):
  """One update. Returns (state, metrics); metrics are global sums/values.

  A non-finite loss or gradient leaves params, optimizer and BatchNorm state
  unchanged and increments `nonfinite_steps` (the training loop stops there
  instead when config.nonfinite == 'stop').
  """
  x = pipeline.to_model_input(batch["image"])
  rng = jax.random.fold_in(jax.random.key(dropout_seed), state.step)
  if axis_name is not None:
    rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))

  def objective(params):
    logits, updates = model.apply(
        {"params": params, "batch_stats": state.batch_stats}, x, train=True,
        mutable=["batch_stats"], rngs={"dropout": rng})
    loss = loss_fn(logits, batch["labels"], mask=batch["mask"],
                   axis_name=axis_name)
    return loss / num_devices, (loss, updates["batch_stats"])

  grads, (loss, batch_stats) = jax.grad(objective, has_aux=True)(state.params)
  if axis_name is not None:
    grads = jax.lax.psum(grads, axis_name)
    if not model.bn_axis_name:
      # Unsynchronised BatchNorm: each device saw only its share, so its
      # running statistics differ; keep their mean (flax's imagenet example).
      batch_stats = jax.lax.pmean(batch_stats, axis_name)
  finite = jnp.isfinite(loss) & _tree_all_finite(grads)
  updated = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  keep = lambda new, old: jax.tree_util.tree_map(
      lambda n, o: jnp.where(finite, n, o), new, old)
  new_state = updated.replace(
      params=keep(updated.params, state.params),
      opt_state=keep(updated.opt_state, state.opt_state),
      batch_stats=keep(updated.batch_stats, state.batch_stats),
      nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32))
  disease_labels = batch["labels"][:, :L.NUM_DISEASES] * batch["mask"][:, None]
  positives = jnp.sum(disease_labels)
  images = jnp.sum(batch["mask"])
  if axis_name is not None:
    positives = jax.lax.psum(positives, axis_name)
    images = jax.lax.psum(images, axis_name)
  return new_state, {"loss": loss, "finite": finite, "positives": positives,
                     "images": images}


def eval_step(state: TrainState, batch, *, model: InceptionV3,
              loss_fn: Callable, axis_name: str | None = None):
  """(sigmoid probabilities of all outputs, the batch's loss)."""
  x = pipeline.to_model_input(batch["image"])
  logits = model.apply({"params": state.params,
                        "batch_stats": state.batch_stats}, x, train=False)
  loss = loss_fn(logits, batch["labels"], mask=batch["mask"],
                 axis_name=axis_name)
  return jax.nn.sigmoid(logits), loss


# --------------------------------------------------------------------------
# Wrapping the steps for devices
# --------------------------------------------------------------------------

class Trainer:
  """Binds the per-device steps to shard_map or pmap and moves data/state."""

  def __init__(self, config, num_devices: int | None = None,
               model_fn: Callable | None = None):
    """`model_fn(config, axis_name)` replaces `build_model` (tests use a small
    network to exercise the same steps and collectives quickly)."""
    self.config = config
    model_fn = model_fn or build_model
    self.mode = config.parallel
    if self.mode not in ("shard_map", "pmap"):
      raise ValueError(f"config.parallel must be 'shard_map' or 'pmap', got "
                       f"{self.mode!r}")
    devices = jax.devices()
    if num_devices:
      devices = devices[:num_devices]
    self.num_devices = len(devices)
    if config.batch_size % self.num_devices:
      raise ValueError(f"global batch {config.batch_size} is not divisible "
                       f"by {self.num_devices} devices")
    axis = parallel.AXIS
    self.model = model_fn(config, axis)
    self.eval_model = model_fn(config, None)
    loss_kwargs = dict(config.loss_kwargs) if config.loss_kwargs else {}
    self.loss_fn = losses.get_loss(config.loss, config.aux_task,
                                   **loss_kwargs)
    train = functools.partial(train_step, model=self.model,
                              loss_fn=self.loss_fn, axis_name=axis,
                              num_devices=self.num_devices,
                              dropout_seed=config.seed)
    evaluate = functools.partial(eval_step, model=self.eval_model,
                                 loss_fn=self.loss_fn, axis_name=axis)
    if self.mode == "shard_map":
      from jax.sharding import PartitionSpec as P
      self.mesh = parallel.make_mesh(devices)
      self._train = parallel.shard_map_step(train, self.mesh, (P(), P()))
      self._eval = parallel.shard_map_step(evaluate, self.mesh,
                                           (P(axis), P()), donate_state=False)
    else:
      if num_devices and num_devices != jax.local_device_count():
        raise ValueError("pmap runs on all local devices")
      self.mesh = None
      self._train = parallel.pmap_step(train)
      self._eval = parallel.pmap_step(evaluate, donate_state=False)

  def init_state(self, rng) -> TrainState:
    state = create_train_state(self.config, self.eval_model, rng)
    return self.put_state(state)

  def put_state(self, state):
    if self.mode == "shard_map":
      return jax.device_put(state, parallel.replicated(self.mesh))
    return parallel.replicate_pmap(state)

  def host_state(self, state):
    """The state as one host copy (for checkpoints and analysis)."""
    if self.mode == "pmap":
      state = parallel.unreplicate_pmap(state)
    return state

  def _put_batch(self, local):
    if self.mode == "shard_map":
      return parallel.global_batch(local, self.mesh)
    return parallel.split_for_pmap(local)

  def train(self, state, local_batch):
    state, m = self._train(state, self._put_batch(local_batch))
    if self.mode == "pmap":
      m = parallel.unreplicate_pmap(m)
    return state, m

  def predict(self, state, local_batch) -> tuple[np.ndarray, float]:
    """This process's probabilities for its share of the batch, and the
    global batch loss."""
    probs, loss = self._eval(state, self._put_batch(local_batch))
    if self.mode == "pmap":
      return (np.asarray(probs).reshape(-1, probs.shape[-1]),
              float(np.asarray(loss)[0]))
    return parallel.process_rows(probs), float(loss)


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------

def load_splits(config, dataset: pipeline.PreparedDataset):
  """Train/val/test names restricted to the prepared images, with counts of
  any split image that was not prepared (e.g. built with --allow_missing)."""
  from cxr_jax.data import metadata, splits
  if config.split_dir:
    parts = splits.read_splits(config.split_dir)
  else:
    meta = metadata.read_all(config.data_dir)
    parts = splits.make_splits(meta, config.split_scheme, config.split_seed,
                               config.view or None)
  present = set(dataset.names)
  out, dropped = {}, {}
  for name, names in parts.as_dict().items():
    out[name] = [n for n in names if n in present]
    dropped[name] = len(names) - len(out[name])
  return out, dropped


def _validation(trainer, state, dataset, names, config):
  """(per-class AUC [14], mean AUC, defined classes, val loss)."""
  probs, labels, losses_, weights_ = [], [], [], []
  pi, pc = jax.process_index(), jax.process_count()
  for batch in pipeline.eval_batches(dataset, names, config.eval_batch_size,
                                     pi, pc, config.loader_threads):
    p, loss = trainer.predict(state, batch)
    keep = batch["mask"] > 0
    probs.append(p[keep])
    labels.append(batch["labels"][keep])
    losses_.append(loss)
    weights_.append(float(batch["mask"].sum()))
  probs, labels = parallel.all_process_rows(np.concatenate(probs),
                                            np.concatenate(labels))
  import warnings
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    aucs = metrics.per_class_auc(labels[:, :L.NUM_DISEASES],
                                 probs[:, :L.NUM_DISEASES])
  mean, defined = metrics.mean_auc(aucs)
  val_loss = float(np.average(losses_, weights=weights_))
  return aucs, mean, defined, val_loss


# --------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------

class MetricLog:
  """TensorBoard events and metrics.jsonl, written by process 0 only."""

  def __init__(self, workdir: str):
    self.active = jax.process_index() == 0
    self.tb = None
    if self.active:
      os.makedirs(workdir, exist_ok=True)
      self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
      try:
        from tensorboardX import SummaryWriter
        self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      except ImportError:
        log.warning("tensorboardX not installed: no TensorBoard events")

  def write(self, step: int, values: dict[str, float]) -> None:
    if not self.active:
      return
    self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
    self.jsonl.flush()
    if self.tb is not None:
      for k, v in values.items():
        if isinstance(v, (int, float)) and math.isfinite(v):
          self.tb.add_scalar(k, v, step)
      self.tb.flush()

  def close(self):
    if self.active:
      self.jsonl.close()
      if self.tb is not None:
        self.tb.close()


class _Preemption:
  """SIGTERM sets a flag; the loop saves the current step and exits."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


class NonFiniteLoss(RuntimeError):
  pass


class Preempted(SystemExit):
  pass


# --------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str
                       ) -> dict[str, Any]:
  """Trains, evaluates on the validation split, checkpoints and resumes.

  Returns a summary: final step, best validation mean AUC and step,
  non-finite steps, images/s.
  """
  from cxr_jax import checkpoint
  is_main = jax.process_index() == 0
  dataset = pipeline.PreparedDataset(config.data_dir, config.image_size)
  if dataset.image_size != config.image_size:
    raise ValueError(f"{dataset.path} is {dataset.image_size}px; config asks "
                     f"for {config.image_size}")
  names, dropped = load_splits(config, dataset)
  trainer = Trainer(config)
  mgr = checkpoint.manager(workdir)
  rng = jax.random.key(config.seed)
  state = trainer.init_state(rng)
  host = trainer.host_state(state)
  n_params = count_parameters({"params": host.params,
                               "batch_stats": host.batch_stats})
  data_iter = iter(pipeline.train_dataset(
      dataset, names["train"], config.batch_size, config.seed,
      pipeline.Augment(config.augment_flip, config.augment_min_crop),
      threads=config.loader_threads))
  start = 0
  latest = mgr.latest_step()
  if latest is not None:
    host = trainer.host_state(state)
    restored, data_state = checkpoint.restore_state(mgr, latest, host)
    state = trainer.put_state(restored)
    data_iter.set_state(data_state)
    start = latest
  val_names = names["val"][:config.max_eval_images or None]

  header = {
      "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind} "
                 f"({jax.local_device_count()} local)",
      "processes": jax.process_count(), "parallel": config.parallel,
      "global_batch": config.batch_size,
      "per_device_batch": config.batch_size // trainer.num_devices,
      "parameters": n_params,
      "split_sizes": {k: len(v) for k, v in names.items()},
      "split_images_not_prepared": dropped,
      "resumed_from_step": start,
  }
  if is_main:
    log.info("config:\n%s", config)
    for k, v in header.items():
      log.info("%s: %s", k, v)
    with open(os.path.join(workdir, "run_header.json"), "w") as f:
      json.dump(header, f, indent=2)
  metric_log = MetricLog(workdir)
  preemption = _Preemption()
  progress = None
  if is_main:
    from tqdm import tqdm
    progress = tqdm(total=config.num_train_steps, initial=start,
                    desc="train", unit="step", dynamic_ncols=True)
  best = {"auc": -math.inf, "step": None}
  window, window_start = [], time.perf_counter()
  images_per_s = float("nan")
  step = start
  schedule = learning_rate_schedule(config)
  lr_at = schedule if callable(schedule) else (lambda _: schedule)
  try:
    while step < config.num_train_steps:
      if preemption.requested:
        # The scheduled save may already hold this step (SIGTERM right after
        # it): saving it again would raise instead of exiting cleanly.
        mgr.wait_until_finished()
        if mgr.latest_step() != step:
          checkpoint.save(mgr, step, trainer.host_state(state),
                          data_iter.get_state(), config, force=True)
          mgr.wait_until_finished()
        raise Preempted(f"SIGTERM: saved step {step} to {workdir}")
      state, m = trainer.train(state, next(data_iter))
      step += 1
      window.append(m)
      if config.nonfinite == "stop" and not bool(m["finite"]):
        raise NonFiniteLoss(
            f"non-finite loss at step {step}: the batch had "
            f"{int(m['positives'])} positive disease labels in "
            f"{int(m['images'])} images (config.nonfinite='stop')")
      if step % config.log_every_steps == 0 or step == config.num_train_steps:
        fetched = jax.device_get(window)
        elapsed = time.perf_counter() - window_start
        images_per_s = sum(float(x["images"]) for x in fetched) / elapsed
        losses_ = [float(x["loss"]) for x in fetched]
        finite = [v for v in losses_ if math.isfinite(v)]
        nonfinite = int(np.asarray(trainer.host_state(state).nonfinite_steps))
        metric_log.write(step, {
            "train_loss": float(np.mean(finite)) if finite else float("nan"),
            "learning_rate": float(lr_at(step)), "images_per_s": images_per_s,
            "nonfinite_steps": nonfinite})
        if progress is not None:
          progress.set_postfix(loss=f"{losses_[-1]:.4f}",
                               img_s=f"{images_per_s:.1f}")
        window, window_start = [], time.perf_counter()
      if progress is not None:
        progress.update(1)
      evaluate = (step % config.eval_every_steps == 0 or
                  step == config.num_train_steps)
      if evaluate and val_names:
        aucs, mean, defined, val_loss = _validation(trainer, state, dataset,
                                                    val_names, config)
        values = {"val_loss": val_loss, "val_mean_auc": mean,
                  "val_defined_classes": defined}
        values.update({f"val_auc/{d}": float(a)
                       for d, a in zip(L.DISEASES, aucs)})
        metric_log.write(step, values)
        if math.isfinite(mean) and mean > best["auc"]:
          best = {"auc": mean, "step": step}
        checkpoint.save(mgr, step, trainer.host_state(state),
                        data_iter.get_state(), config,
                        metrics={checkpoint.METRIC: mean if math.isfinite(mean)
                                 else -1.0})
      elif step % config.checkpoint_every_steps == 0 or (
          step == config.num_train_steps):
        checkpoint.save(mgr, step, trainer.host_state(state),
                        data_iter.get_state(), config)
  finally:
    mgr.wait_until_finished()
    preemption.restore()
    metric_log.close()
    if progress is not None:
      progress.close()
  nonfinite = int(np.asarray(trainer.host_state(state).nonfinite_steps))
  summary = {"step": step, "best_val_mean_auc": best["auc"],
             "best_step": mgr.best_step(), "nonfinite_steps": nonfinite,
             "images_per_s": images_per_s}
  if is_main:
    log.info("done: %s", summary)
  return summary
