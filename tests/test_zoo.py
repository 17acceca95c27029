"""Every registered backbone behind the one interface: a few real training
steps on 2 devices, then class maps for CAM from the one inference path;
and a transfer run that evaluates, predicts and localizes with its ImageNet
file deleted. (Each family's parity proofs are in tests/test_zoo_<family>.py.)"""

import importlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import (SmallNet, random_batches, random_variables,
                      train_config)
from cxr_jax import (checkpoint, compilation, inference, models, parallel,
                     train, weights)
from cxr_jax import labels as L

# One network of every family of Table 6, and CheXNet's DenseNet-121, trains.
# A family's deeper variants (ResNet-101/152, VGG19, DenseNet-169/201) run
# the same blocks, more of them: their parity tests prove their weights and
# forward pass, and training them only adds minutes of compilation.
TRAINED = ["resnet50", "vgg16", "bn_inception", "inception_v4",
           "inception_resnet_v2", "densenet121"]
# InceptionV3 trains through the same Trainer in tests/test_demo.py (to a
# measured AUC, then CAM boxes) and tests/test_train.py (8 devices against 1
# in float64, preemption): a third compile of its step here adds nothing.
TRAINED_ELSEWHERE = ["inception_v3"]
# Their training steps compile for up to three minutes each on 2 cores: the
# slow tier runs them; the fast tier trains VGG16, the quickest to compile.
FAST = {"vgg16"}


@pytest.fixture
def quick_compile(request):
  """XLA's cheapest compile: these steps check plumbing, not numerics, and
  a deep backbone's training step otherwise compiles for minutes on 2 cores.
  Not for the families that scan their blocks: their steps compile fast
  already, and a scanned step compiled without optimizations runs about 10x
  slower (Inception V4 at 75 px: 17 s a step against 1.8 s), which costs
  more than it saves."""
  if models.scans_blocks(request.node.callspec.params["name"]):
    yield
    return
  with compilation.quick_compile():
    yield


def _min_size(name: str) -> int:
  module = importlib.import_module(models.MODELS[name][0].__module__)
  size = max(75, models.min_input_size(name))
  # Some upstreams compute only some sizes (the Caffe BN-Inception's
  # ceil-mode pools): take the next size the network computes.
  if hasattr(module, "computable_size"):
    size = module.computable_size(size, round_up=True)
  return size


def test_every_table6_family_and_densenet121_is_trained():
  from configs import paper
  table6 = {paper.get_config(row).model_name for row in paper.ROWS
            if row.startswith("table6_")}
  assert table6 | {"densenet121"} <= set(models.MODELS)
  family = lambda name: models.MODELS[name][0]  # the constructor
  trained = TRAINED + TRAINED_ELSEWHERE
  assert {family(n) for n in table6 | {"densenet121"}} == {
      family(n) for n in trained}
  assert len({family(n) for n in trained}) == len(trained)  # one each


@pytest.mark.parametrize("name", [
    n if n in FAST else pytest.param(n, marks=pytest.mark.slow)
    for n in TRAINED])
def test_trains_a_few_steps_and_yields_class_maps(name, quick_compile):
  size = _min_size(name)
  c = train_config(model_name=name, image_size=size, batch_size=4,
                   optimizer="adam", learning_rate=1e-3, loss="cw_cel")
  c.model = {"dtype": "float32"}
  trainer = train.Trainer(c, num_devices=2)
  # Variables drawn by numpy, not the compiled init (a PRNG draw per
  # parameter): Inception-ResNet-V2's init alone compiled for 32 s. The
  # init's shapes are still traced (eval_shape); InceptionV3's compiled init
  # runs in test_demo.py and test_train.py.
  state = trainer.state_from_variables(
      random_variables(trainer.eval_model, size))
  before = jax.device_get(state.params)
  for batch in random_batches(n=2, size=size, batch=4):
    state, m = trainer.train(state, batch)
    assert np.isfinite(float(m["loss"])), name
  moved = jax.tree_util.tree_map(lambda a, b: float(np.abs(a - b).max()),
                                 jax.device_get(state.params), before)
  assert max(jax.tree_util.tree_leaves(moved)) > 0, name
  forward = inference.Inference(trainer.eval_model,
                                parallel.make_mesh(jax.devices()[:2]),
                                class_maps=True)
  out = forward(forward.put({"params": state.params,
                             "batch_stats": state.batch_stats}),
                {"image": random_batches(n=1, size=size, batch=2)[0]["image"],
                 "mask": np.ones(2, np.float32)})
  cells = trainer.eval_model.feature_grid(size)[0]
  assert out["class_maps"].shape == (2, cells, cells, L.NUM_DISEASES), name
  assert out["probs"].shape == (2, L.NUM_OUTPUTS)


def test_transfer_run_analyses_with_its_weights_file_deleted(
    tiny_data, tmp_path, monkeypatch):
  """The run records the weights' architecture facts in its config, so
  evaluate, predict and localize rebuild the model from the checkpoint."""
  from cxr_jax import evaluation, localization, predict
  monkeypatch.setitem(models.MODELS, "small_net", (SmallNet, {}))
  source = SmallNet(num_classes=1000)
  pretrained = jax.device_get(source.init(jax.random.key(7),
                                          jnp.zeros((1, 75, 75, 3))))
  path = str(tmp_path / "imagenet.npz")
  weights.save_converted(path, pretrained, {
      "source": "test", "model": "small_net",
      "model_kwargs": {"bn_momentum": 0.5}})
  c = train_config(data_dir=tiny_data, model_name="small_net",
                   init_weights=path, transfer=True, num_train_steps=2,
                   eval_every_steps=2, checkpoint_every_steps=2,
                   log_every_steps=2, batch_size=8, loader_threads=1)
  c.model = {"dtype": "float32"}
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(c, workdir)
  os.remove(path)
  ev = evaluation.evaluate(workdir, "latest", "test", num_resamples=10)
  assert ev["num_images"] > 0
  restored = checkpoint.restore(workdir, "latest")[1]
  assert restored.model.bn_momentum == 0.5 and restored.init_weights == path
  films = [os.path.join(os.path.dirname(tiny_data), "nih", "images", n)
           for n in sorted(os.listdir(os.path.join(os.path.dirname(tiny_data),
                                                   "nih", "images")))[:2]]
  assert len(predict.predict_files(workdir, films, "latest")["results"]) == 2
  assert localization.localize(workdir, which="latest",
                               max_overlays=0)["boxes"] > 0
  # Weights of another backbone, or a config that contradicts the file, are
  # named errors.
  weights.save_converted(path, pretrained, {"model": "resnet50"})
  with pytest.raises(weights.ConversionError, match="config.model_name"):
    weights.adopt_architecture(train_config(model_name="small_net",
                                            init_weights=path))
  weights.save_converted(path, pretrained, {
      "model": "small_net", "model_kwargs": {"bn_momentum": 0.5}})
  clash = train_config(model_name="small_net", init_weights=path)
  clash.model.bn_momentum = 0.9
  with pytest.raises(weights.ConversionError, match="config.model.bn_momentum"):
    weights.adopt_architecture(clash)
