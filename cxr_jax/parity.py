"""Numerical parity of our InceptionV3 with reference implementations.

ImageNet weights cannot be downloaded everywhere, so the converters are proven
on a Keras 3 InceptionV3 (JAX backend) with random weights. Random BatchNorm
moving statistics are essential: left at 0/1 they would hide a swapped mean
and variance, or a BN paired with the wrong convolution.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import jax
import numpy as np

from cxr_jax import weights
from cxr_jax.models import FEATURE_MAP, InceptionV3


def _keras():
  os.environ.setdefault("KERAS_BACKEND", "jax")
  import keras
  if keras.backend.backend() != "jax":
    raise RuntimeError("the Keras reference must run on the JAX backend; set "
                       "KERAS_BACKEND=jax before importing keras")
  return keras


def build_keras_reference(size: int = 299, num_classes: int = 1000,
                          seed: int = 0):
  """Keras' InceptionV3 (logits out) with random weights and BN statistics."""
  keras = _keras()
  keras.utils.set_random_seed(seed)
  model = keras.applications.InceptionV3(
      weights=None, input_shape=(size, size, 3), classes=num_classes,
      classifier_activation=None)
  rng = np.random.default_rng(seed)
  for layer in model.layers:
    if isinstance(layer, keras.layers.BatchNormalization):
      n = layer.moving_mean.shape[0]
      layer.beta.assign(rng.normal(0.0, 0.2, n).astype(np.float32))
      layer.moving_mean.assign(rng.normal(0.0, 0.2, n).astype(np.float32))
      layer.moving_variance.assign(rng.uniform(0.5, 2.0, n).astype(np.float32))
  return model


def keras_at_size(model, size: int):
  """The same weights in a Keras model built for another input size."""
  keras = _keras()
  other = keras.applications.InceptionV3(
      weights=None, input_shape=(size, size, 3), classes=model.output_shape[-1],
      classifier_activation=None)
  other.set_weights(model.get_weights())
  return other


def save_keras_weights(model, directory: str) -> dict[str, str]:
  """Writes both Keras layouts; returns {'legacy': path, 'keras3': path}."""
  import h5py
  from keras.src.legacy.saving import legacy_h5_format
  paths = {"legacy": os.path.join(directory, "inception_v3_legacy.h5"),
           "keras3": os.path.join(directory, "inception_v3.weights.h5")}
  with h5py.File(paths["legacy"], "w") as f:
    legacy_h5_format.save_weights_to_hdf5_group(f, model)
  model.save_weights(paths["keras3"])
  return paths


def keras_outputs(model, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(logits, Mixed_7c map) of a Keras InceptionV3 in inference mode."""
  keras = _keras()
  probe = keras.Model(model.input, [model.output,
                                    model.get_layer("mixed10").output])
  logits, fmap = probe(x, training=False)
  return np.asarray(logits), np.asarray(fmap)


def flax_outputs(variables: Any, x: np.ndarray, **model_kwargs
                 ) -> tuple[np.ndarray, np.ndarray]:
  """(logits, Mixed_7c map) of our model in inference mode."""
  num_classes = variables["params"]["head"]["bias"].shape[0]
  model = InceptionV3(num_classes=num_classes, **model_kwargs)
  fn = jax.jit(lambda v, x: model.apply(v, x, train=False,
                                        return_features=True))
  logits, feats = fn(variables, x)
  return np.asarray(logits), np.asarray(feats[FEATURE_MAP])


def relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
  """||ours - reference|| / ||reference|| in float64."""
  ours, reference = np.asarray(ours, np.float64), np.asarray(reference,
                                                             np.float64)
  return float(np.linalg.norm(ours - reference) / np.linalg.norm(reference))


def keras_parity(sizes=(299, 107), batch: int = 2, seed: int = 0
                 ) -> dict[str, float]:
  """Converts both Keras layouts and compares logits and Mixed_7c maps.

  Returns {'<layout>@<size>/<logits|Mixed_7c>': relative error}.
  """
  reference = build_keras_reference(sizes[0], seed=seed)
  errors = {}
  rng = np.random.default_rng(seed + 1)
  with tempfile.TemporaryDirectory() as tmp:
    paths = save_keras_weights(reference, tmp)
    converted = {}
    for layout, path in paths.items():
      variables, _ = weights.convert_keras(path)
      out = os.path.join(tmp, f"{layout}.npz")
      weights.save_converted(out, variables, {"source": "keras"})
      converted[layout] = weights.load_pretrained(out)
    for size in sizes:
      ref = reference if size == sizes[0] else keras_at_size(reference, size)
      x = rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
      k_logits, k_map = keras_outputs(ref, x)
      for layout, variables in converted.items():
        f_logits, f_map = flax_outputs(variables, x)
        errors[f"{layout}@{size}/logits"] = relative_error(f_logits, k_logits)
        errors[f"{layout}@{size}/{FEATURE_MAP}"] = relative_error(f_map, k_map)
  return errors
