"""Parity against `keras.applications` (Keras 3, JAX backend), random weights.

Each Keras family is one row of `KERAS_REFERENCES`: the application's
constructor name and the layer whose output is the map our head reads. The
check builds the application with random weights and random BatchNorm
statistics, writes both Keras weight layouts (legacy `.h5` and Keras 3
`.weights.h5`), converts each with `cxr_jax.weights.convert`, and compares
logits and the feature map at every size.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import tempfile
from typing import Callable

import numpy as np

from cxr_jax import compilation, weights
from cxr_jax.parity.common import flax_outputs, max_abs_error, torch_available


@dataclasses.dataclass(frozen=True)
class KerasReference:
  application: str        # keras.applications constructor
  feature_layer: str      # the layer whose output our head pools
  # keras.applications.<module>.preprocess_input turns pixels 0..255 into the
  # application's input; ours takes [-1, 1] and normalises inside the model.
  preprocess_module: str = "inception_v3"
  # Optional builder(keras, size, num_classes) for applications whose own top
  # is not global pooling + a dense layer (VGG's fc6/fc7).
  build: Callable | None = None


KERAS_REFERENCES: dict[str, KerasReference] = {
    "inception_v3": KerasReference("InceptionV3", "mixed10", "inception_v3"),
}


def _keras():
  os.environ.setdefault("KERAS_BACKEND", "jax")
  import keras
  if keras.backend.backend() != "jax":
    raise RuntimeError("the Keras reference must run on the JAX backend; set "
                       "KERAS_BACKEND=jax before importing keras")
  return keras


def randomize_batch_norm(model, seed: int) -> None:
  """Random beta, moving mean and variance (and gamma where there is one)."""
  keras = _keras()
  rng = np.random.default_rng(seed)
  for layer in model.layers:
    if isinstance(layer, keras.layers.BatchNormalization):
      n = layer.moving_mean.shape[0]
      if layer.gamma is not None:
        layer.gamma.assign(rng.uniform(0.5, 1.5, n).astype(np.float32))
      layer.beta.assign(rng.normal(0.0, 0.2, n).astype(np.float32))
      layer.moving_mean.assign(rng.normal(0.0, 0.2, n).astype(np.float32))
      layer.moving_variance.assign(rng.uniform(0.5, 2.0, n).astype(np.float32))


def build_keras_reference(ref: KerasReference, size: int = 299,
                          num_classes: int = 1000, seed: int = 0):
  """The Keras application (logits out) with random weights and statistics."""
  keras = _keras()
  keras.utils.set_random_seed(seed)
  net = _construct(keras, ref, size, num_classes)
  randomize_batch_norm(net, seed)
  return net


def _construct(keras, ref: KerasReference, size: int, num_classes: int):
  # Keras draws each variable's initial value with a JAX program compiled
  # for its shape, and compiling those dominates building an application.
  # Quick compile halves that; the draws differ from fully optimised ones
  # only in the last bit, and any random weights serve a parity check.
  with compilation.quick_compile():
    if ref.build is not None:
      return ref.build(keras, size, num_classes)
    return getattr(keras.applications, ref.application)(
        weights=None, input_shape=(size, size, 3), classes=num_classes,
        classifier_activation=None)


def keras_at_size(ref: KerasReference, net, size: int):
  """The same weights in a Keras model built for another input size."""
  keras = _keras()
  other = _construct(keras, ref, size, net.output_shape[-1])
  other.set_weights(net.get_weights())
  return other


def save_keras_weights(net, directory: str, stem: str = "model"
                       ) -> dict[str, str]:
  """Writes both Keras layouts; returns {'legacy': path, 'keras3': path}."""
  import h5py
  from keras.src.legacy.saving import legacy_h5_format
  paths = {"legacy": os.path.join(directory, f"{stem}_legacy.h5"),
           "keras3": os.path.join(directory, f"{stem}.weights.h5")}
  with h5py.File(paths["legacy"], "w") as f:
    legacy_h5_format.save_weights_to_hdf5_group(f, net)
  net.save_weights(paths["keras3"])
  return paths


def keras_outputs(ref: KerasReference, net, x: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
  """(logits, feature map) of a Keras application in inference mode, for
  our input `x` in [-1, 1] preprocessed as the application expects."""
  import jax
  keras = _keras()
  module = getattr(keras.applications, ref.preprocess_module)
  pixels = (np.asarray(x, np.float32) + 1.0) * 127.5
  probe = keras.Model(net.input,
                      [net.output, net.get_layer(ref.feature_layer).output])
  # One XLA program: Keras' eager call compiles op by op, several times
  # slower for a deep application on CPU.
  run = jax.jit(lambda trainable, fixed, inputs: probe.stateless_call(
      trainable, fixed, inputs, training=False)[0])
  logits, fmap = run([v.value for v in probe.trainable_variables],
                     [v.value for v in probe.non_trainable_variables],
                     module.preprocess_input(pixels.copy()))
  return np.asarray(logits), np.asarray(fmap)


def keras_parity(model: str, ref: KerasReference, sizes=(299, 224),
                 batch: int = 2, seed: int = 0) -> dict[str, float]:
  """Converts both Keras layouts of a random `ref` application into our
  `model` and compares logits and feature maps:
  {'<layout>@<size>/<logits|feature_map>': max abs error}."""
  reference = build_keras_reference(ref, sizes[0], seed=seed)
  errors = {}
  rng = np.random.default_rng(seed + 1)
  with tempfile.TemporaryDirectory() as tmp:
    paths = save_keras_weights(reference, tmp, model)
    converted = {}
    for layout, path in paths.items():
      out = os.path.join(tmp, f"{layout}.npz")
      weights.convert(model, "keras", path, out)
      converted[layout] = (weights.load_pretrained(out),
                           weights.architecture(out)[1])
    for size in sizes:
      net = (reference if size == sizes[0]
             else keras_at_size(ref, reference, size))
      x = rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
      k_logits, k_map = keras_outputs(ref, net, x)
      for layout, (variables, kwargs) in converted.items():
        f_logits, f_map = flax_outputs(model, variables, x, **kwargs)
        errors[f"{layout}@{size}/logits"] = max_abs_error(f_logits, k_logits)
        errors[f"{layout}@{size}/feature_map"] = max_abs_error(f_map, k_map)
  return errors


def checks(references: dict[str, KerasReference]) -> dict[str, Callable]:
  """{model: parity check} for rows of Keras references."""
  return {name: functools.partial(keras_parity, name, ref)
          for name, ref in references.items()}


def keras_and_torch_parity(model: str, ref: KerasReference, torch_module,
                           sizes=(299, 224), batch: int = 2, seed: int = 0
                           ) -> dict[str, float]:
  """Both Keras layouts of `ref`, then `torch_module.torch_parity`'s torch
  reference, one error dict; without torch, the Keras errors alone (the log
  says so)."""
  errors = keras_parity(model, ref, sizes, batch, seed)
  if torch_available(f"{model}'s torch reference parity"):
    errors.update(torch_module.torch_parity(model, sizes, batch, seed))
  return errors


def checks_with_torch(references: dict[str, KerasReference], torch_module
                      ) -> dict[str, Callable]:
  """{model: parity check} for rows of Keras references whose models also
  have a torch reference in `torch_module` (see keras_and_torch_parity)."""
  return {name: functools.partial(keras_and_torch_parity, name, ref,
                                  torch_module)
          for name, ref in references.items()}


CHECKS = checks(KERAS_REFERENCES)
