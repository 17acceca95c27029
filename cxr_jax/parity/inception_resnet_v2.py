"""Inception-ResNet-V2 parity: `keras.applications.InceptionResNetV2` (Keras
3, JAX backend) with random weights and BatchNorm statistics, both Keras
layouts, logits and the conv_7b map (Keras' `conv_7b_ac`)."""

from __future__ import annotations

from cxr_jax.parity import keras

REFERENCES = {
    "inception_resnet_v2": keras.KerasReference(
        "InceptionResNetV2", "conv_7b_ac", "inception_resnet_v2"),
}
CHECKS = keras.checks(REFERENCES)
