"""Backbones. Each returns logits and, on request, named features for CAM."""

from cxr_jax.models.inception_v3 import (FEATURE_MAP, MIN_INPUT_SIZE,
                                         InceptionV3, count_parameters)

__all__ = ["InceptionV3", "FEATURE_MAP", "MIN_INPUT_SIZE", "count_parameters"]
