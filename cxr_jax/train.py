"""Training: the pure per-device step and `train_and_evaluate(config, workdir)`.

`train_step(state, batch)` is written once, per device, with named-axis
collectives over 'data'; static choices are bound with functools.partial.
The same function runs on one device (axis_name=None) or wrapped by either
back-end of `cxr_jax.parallel`.

Gradient semantics: each device differentiates the *global* loss divided by
the number of devices and the gradients are psum-med. Through the loss's
psum-med counts and BatchNorm's pmean-ed statistics, the collectives'
transposes route every cross-device term, so N devices compute exactly the
gradient of the one-device loss on the global batch (tests/test_train.py).

Validation runs the one analysis forward path, `cxr_jax.inference`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
from flax.training import train_state
from tqdm import tqdm

from cxr_jax import (checkpoint, compilation, inference, losses, metrics,
                     models, optim)
from cxr_jax import labels as L
from cxr_jax import parallel, weights
from cxr_jax.data import pipeline, splits
from cxr_jax.metric_log import MetricLog, TrainWindow
from cxr_jax.preemption import (FolderLock, NonfiniteWatch,
                                Preempted, Preemption)

log = logging.getLogger(__name__)


class TrainState(train_state.TrainState):
  batch_stats: Any
  nonfinite_steps: jax.Array


def _init_variables(config, model, rng) -> dict:
  """The model's fresh variables for the config's input size."""
  x = jnp.zeros((1, config.image_size, config.image_size, 3))
  return jax.jit(functools.partial(model.init, train=False))(rng, x)


def create_train_state(config, model, rng) -> TrainState:
  """Fresh variables, or converted ImageNet weights with a fresh head."""
  variables = _init_variables(config, model, rng)
  if config.init_weights:
    variables = weights.merge_pretrained(
        variables, weights.load_pretrained(config.init_weights),
        dont_load=[r"^params/head/", r"/transition/"])
    variables = jax.tree_util.tree_map(jnp.asarray, variables)
  elif config.transfer:
    raise ValueError("this experiment trains from ImageNet weights: set "
                     "--config.init_weights=FILE (cxr-jax convert-weights), "
                     "or --config.transfer=false to train from scratch (NT)")
  return state_from_variables(config, model, variables)


def abstract_train_state(config, model) -> TrainState:
  """`create_train_state`'s shapes and dtypes, traced but neither compiled
  nor run. ImageNet weights take the init's shapes, so they are not loaded."""
  return jax.eval_shape(lambda rng: state_from_variables(
      config, model, _init_variables(config, model, rng)), jax.random.key(0))


def state_from_variables(config, model, variables) -> TrainState:
  """The step-0 state of `variables` ({'params', 'batch_stats'}): a fresh
  optimizer of the config's kind, no non-finite steps yet."""
  return TrainState.create(
      apply_fn=model.apply, params=variables["params"],
      batch_stats=variables.get("batch_stats", {}),
      tx=optim.from_config(config), nonfinite_steps=jnp.zeros((), jnp.int32))


def _tree_all_finite(tree) -> jax.Array:
  leaves = jax.tree_util.tree_leaves(tree)
  return jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in leaves]))


def train_step(state: TrainState, batch, *, model, loss_fn: Callable,
               axis_name: str | None = None, num_devices: int = 1,
               dropout_seed: int = 0):
  """One update. Returns (state, metrics); metrics are global sums/values.

  A non-finite loss, gradient or updated parameter (a finite gradient times
  a non-finite learning rate) leaves params, optimizer and BatchNorm state
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
  updated = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  finite = (jnp.isfinite(loss) & _tree_all_finite(grads) &
            _tree_all_finite(updated.params))
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


class Trainer:
  """The config's model, loss and per-device step on a parallel back-end,
  plus the validation forward pass."""

  def __init__(self, config, num_devices: int | None = None,
               model_fn: Callable | None = None):
    """`model_fn(config, axis_name)` replaces `models.from_config` (tests use
    a small network to exercise the same steps and collectives quickly)."""
    self.config = config
    model_fn = model_fn or models.from_config
    devices = jax.devices()[:num_devices] if num_devices else None
    self.backend = parallel.make_backend(config.parallel, devices)
    self.num_devices = self.backend.num_devices
    if config.batch_size % self.num_devices:
      raise ValueError(f"config.batch_size={config.batch_size} is not "
                       f"divisible by {self.num_devices} devices")
    self.model = model_fn(config, parallel.AXIS)
    self.eval_model = model_fn(config, None)
    self.loss_fn = losses.get_loss(config.loss, config.aux_task,
                                   **dict(config.loss_kwargs or {}))
    self._train = self.backend.wrap_step(functools.partial(
        train_step, model=self.model, loss_fn=self.loss_fn,
        axis_name=parallel.AXIS, num_devices=self.num_devices,
        dropout_seed=config.seed))
    self.inference = inference.Inference(
        self.eval_model, parallel.make_mesh(devices), loss_fn=self.loss_fn)

  def init_state(self, rng) -> TrainState:
    return self.backend.put_state(
        create_train_state(self.config, self.eval_model, rng))

  def abstract_state(self) -> TrainState:
    """`init_state`'s shapes, dtypes and placement, without compiling the
    init (tens of seconds for a deep network): what a resume restores
    into."""
    sharding = self.backend.state_sharding()
    return jax.tree_util.tree_map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
        abstract_train_state(self.config, self.eval_model))

  def state_from_variables(self, variables) -> TrainState:
    """The step-0 state of given variables, placed as `init_state`'s is."""
    return self.backend.put_state(
        state_from_variables(self.config, self.eval_model, variables))

  def train(self, state: TrainState, local_batch) -> tuple[TrainState, dict]:
    """One step on this process's share of a batch (placed here)."""
    return self.step(state, self.backend.put_batch(local_batch))

  def step(self, state: TrainState, placed_batch) -> tuple[TrainState, dict]:
    """One step on a batch already placed by `backend.put_batch`."""
    return self._train(state, placed_batch)

  def compile(self, state: TrainState, placed_batch) -> dict[str, Any]:
    """Compiles the step for these arguments before it first runs; returns
    the seconds and what the persistent cache said (run_header.json)."""
    return compilation.compile_ahead(self._train, state, placed_batch)

  def validate(self, state: TrainState, dataset, names) -> dict[str, Any]:
    """Per-class AUC [14], mean AUC, defined classes and the loss over
    `names`, every host's rows gathered."""
    variables = self.inference.put({"params": state.params,
                                    "batch_stats": state.batch_stats})
    out = inference.predict_batches(self.inference, variables,
                                    pipeline.eval_batches(
                                        dataset, names,
                                        self.config.eval_batch_size,
                                        threads=self.config.loader_threads))
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", RuntimeWarning)
      aucs = metrics.per_class_auc(out["labels"][:, :L.NUM_DISEASES],
                                   out["probs"][:, :L.NUM_DISEASES])
    mean, defined = metrics.mean_auc(aucs)
    return {"aucs": aucs, "mean": mean, "defined": defined,
            "loss": out["loss"]}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str
                       ) -> dict[str, Any]:
  """Trains, evaluates on the validation split, checkpoints and resumes.

  Returns a summary: final step, best validation mean AUC and step,
  non-finite steps, images/s. Process 0 holds the workdir's lock for the
  whole run: a second run on the same workdir is refused, naming this one.
  """
  if not config.data_dir:
    raise ValueError("no dataset: set --config.data_dir=DIR, a folder "
                     "written by `cxr-jax prepare --out DIR`")
  if not os.path.isdir(config.data_dir):
    raise FileNotFoundError(f"--config.data_dir={config.data_dir}: no such "
                            f"folder")
  lock = (FolderLock(workdir, "train") if jax.process_index() == 0 else
          contextlib.nullcontext())
  with lock:
    return _train_and_evaluate(config, workdir)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str
                        ) -> dict[str, Any]:
  if config.init_weights:  # the run records what its model needs
    weights.adopt_architecture(config)
  cache_dir = compilation.configure_cache(config.compilation_cache,
                                          config.compilation_cache_dir)
  dataset = pipeline.PreparedDataset(config.data_dir, config.image_size)
  if dataset.image_size != config.image_size:
    raise ValueError(f"{dataset.path} is {dataset.image_size}px; config asks "
                     f"for {config.image_size}")
  names, dropped = splits.for_dataset(config, dataset.names)
  trainer = Trainer(config)
  mgr = checkpoint.manager(workdir)
  data_iter = iter(pipeline.train_dataset(
      dataset, names["train"], config.batch_size, config.seed,
      pipeline.Augment(config.augment_flip, config.augment_min_crop),
      threads=config.loader_threads, workers=config.loader_workers))
  # A resumed run restores into the state's shapes: it never compiles the
  # init, nor loads a transfer run's ImageNet weights again.
  start, restored, data_state = checkpoint.resume(
      mgr, trainer.abstract_state(), config,
      move_unreadable=jax.process_index() == 0)
  if start:
    state = trainer.backend.put_state(restored)
    data_iter.set_state(data_state)
  else:
    state = trainer.init_state(jax.random.key(config.seed))
  n_params = models.count_parameters({"params": state.params,
                                      "batch_stats": state.batch_stats})
  feed = pipeline.DeviceFeed(data_iter, trainer.backend.put_batch)
  compiled = ({"train_step": trainer.compile(state, feed.peek())}
              if start < config.num_train_steps else {})
  val_names = names["val"][:config.max_eval_images or None]
  is_main = jax.process_index() == 0
  if is_main:
    log.info("config:\n%s", config)
  metric_log = MetricLog(workdir, resume_step=start)
  metric_log.header({
      "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind} "
                 f"({jax.local_device_count()} local)",
      "processes": jax.process_count(), "parallel": config.parallel,
      "model": config.model_name, "global_batch": config.batch_size,
      "per_device_batch": config.batch_size // trainer.num_devices,
      "parameters": n_params,
      "split_sizes": {k: len(v) for k, v in names.items()},
      "split_images_not_prepared": dropped, "resumed_from_step": start,
      "compile": compiled, "compilation_cache_dir": cache_dir})
  progress = tqdm(total=config.num_train_steps, initial=start, desc="train",
                  unit="step", dynamic_ncols=True, disable=not is_main)
  best = checkpoint.best_so_far(mgr)
  window = TrainWindow()
  images_per_s = float("nan")
  step = start
  schedule = optim.learning_rate_schedule(config)
  lr_at = schedule if callable(schedule) else (lambda _: schedule)
  save = lambda **kw: checkpoint.save(mgr, step, state, feed.get_state(),
                                      config, **kw)
  nonfinite = NonfiniteWatch(
      config.nonfinite == "stop",
      lambda at, m: f"non-finite loss, gradient or update at step {at} "
                    f"(learning rate {float(lr_at(at - 1)):g}): the batch had "
                    f"{int(m['positives'])} positive disease labels in "
                    f"{int(m['images'])} images (config.nonfinite='stop')")

  with Preemption() as preemption, metric_log, progress:
    try:
      while step < config.num_train_steps:
        if preemption.requested:
          nonfinite.check()
          # The scheduled save may already hold this step (SIGTERM right
          # after it): saving it again would raise instead of exiting.
          mgr.wait_until_finished()
          if mgr.latest_step() != step:
            save(force=True)
            mgr.wait_until_finished()
          raise Preempted(f"SIGTERM: saved step {step} to {workdir}")
        state, m = trainer.step(state, feed.pop())
        step += 1
        feed.fill()  # the next batches travel while this step runs
        window.append(m)
        nonfinite.add(step, m)
        logs = (step % config.log_every_steps == 0 or
                step == config.num_train_steps)
        validates = bool(val_names) and (
            step % config.eval_every_steps == 0 or
            step == config.num_train_steps)
        saves = validates or step % config.checkpoint_every_steps == 0 or (
            step == config.num_train_steps)
        if logs or saves:
          nonfinite.check()
        if logs:
          logged = window.close()
          images_per_s = logged["images_per_s"]
          metric_log.write(step, {
              "train_loss": logged["train_loss"],
              "learning_rate": float(lr_at(step)),
              "images_per_s": images_per_s,
              "nonfinite_steps": int(state.nonfinite_steps)})
          progress.set_postfix(loss=f"{logged['last_loss']:.4f}",
                               img_s=f"{images_per_s:.1f}")
        progress.update(1)
        if validates:
          val = trainer.validate(state, dataset, val_names)
          metric_log.write(step, {
              "val_loss": val["loss"], "val_mean_auc": val["mean"],
              "val_defined_classes": val["defined"],
              **{f"val_auc/{d}": float(a)
                 for d, a in zip(L.DISEASES, val["aucs"])}})
          metric = checkpoint.validation_metric(val)
          if metric and val["mean"] > best["auc"]:
            best = {"auc": val["mean"], "step": step}
          save(metrics=metric)
        elif saves:
          save()
    finally:
      mgr.wait_until_finished()
      data_iter.close()  # stops loader worker processes now
  summary = {"step": step, "best_val_mean_auc": best["auc"],
             "best_step": mgr.best_step(),
             "nonfinite_steps": int(state.nonfinite_steps),
             "images_per_s": images_per_s}
  if is_main:
    log.info("done: %s", summary)
  return summary
