"""ImageNet weights from the files researchers have, converted by explicit
name maps: a generic format and merge (`weights.common`) and one converter
module per model family.

    convert(model, source, input_path, output_path, **options)

writes an `.npz` that `load_pretrained` reads and `merge_pretrained` loads
into a fresh model with a new head. The file records the architecture facts
its source implies (`architecture(path)`); training copies them into the
run's `config.model`, so analysis rebuilds the model from the checkpoint
alone.
"""

from __future__ import annotations

from typing import Any

from cxr_jax.weights import (bn_inception, densenet, inception_resnet_v2,
                             inception_v3, inception_v4, resnet, vgg)
from cxr_jax.weights.common import (ConversionError, architecture,
                                    load_pretrained, merge_pretrained,
                                    read_metadata, save_converted)

# Every family's converter module: MODELS (registry names it converts) and
# SOURCES ({source: converter(path, model, **options)}).
FAMILIES = (inception_v3, resnet, vgg, densenet, bn_inception, inception_v4,
            inception_resnet_v2)
CONVERTERS: dict[str, dict[str, Any]] = {
    name: family.SOURCES for family in FAMILIES for name in family.MODELS}


def sources(model: str) -> tuple[str, ...]:
  """The weight sources `convert` reads for `model`."""
  return tuple(CONVERTERS.get(model, {}))


def adopt_architecture(config) -> None:
  """Copies the architecture facts of `config.init_weights` into
  `config.model` (in place), so the run's checkpoint rebuilds its model
  without the file. Weights of another backbone, or a config that sets a
  fact differently, are a ConversionError naming the key."""
  path = config.init_weights
  name, facts = architecture(path)
  if name != config.model_name:
    raise ConversionError(f"{path} holds {name} weights, but "
                          f"config.model_name is {config.model_name!r}")
  for key, value in facts.items():
    if key in config.model and config.model[key] != value:
      raise ConversionError(
          f"config.model.{key}={config.model[key]!r}, but the weights of "
          f"{path} need {value!r}")
    config.model[key] = value


def convert(model: str, source: str, input_path: str | None,
            output_path: str, **options) -> dict[str, Any]:
  """The `convert-weights` command: converts and writes; returns the
  metadata. `source='keras-imagenet'` has keras.applications download
  InceptionV3's file first (needs internet)."""
  if model not in CONVERTERS:
    raise ConversionError(f"no converter for model {model!r} (--model); "
                          f"converters exist for {sorted(CONVERTERS)}")
  if source == "keras-imagenet":
    if model != "inception_v3":
      raise ConversionError("--source keras-imagenet downloads InceptionV3 "
                            "only; give --source keras --input FILE")
    input_path = input_path or inception_v3.fetch_keras_imagenet()
    source = "keras"
  if source not in CONVERTERS[model]:
    raise ConversionError(f"no {source!r} converter for {model} (--source); "
                          f"choose one of {sorted(CONVERTERS[model])}")
  if not input_path:
    raise ConversionError(f"--input is required for --source {source}")
  variables, meta = CONVERTERS[model][source](input_path, model, **options)
  save_converted(output_path, variables, meta)
  return meta


__all__ = ["ConversionError", "CONVERTERS", "adopt_architecture",
           "architecture", "convert",
           "load_pretrained", "merge_pretrained", "read_metadata",
           "save_converted", "sources"]
