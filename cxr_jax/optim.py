"""Optimizers by name, with the paper's Adadelta spelled out.

The paper trains with TensorFlow's Adadelta at lr 1e-5. TensorFlow's defaults
(tf.compat.v1.train.AdadeltaOptimizer) are rho=0.95 and epsilon=1e-8; optax's
are rho=0.9 and eps=1e-6, Keras 3's rho=0.95 and epsilon=1e-7. We name all
three hyperparameters and default to TensorFlow's, so a config reproduces the
paper's optimizer exactly. The update rule itself is the same in all three:

    E[g^2]  <- rho E[g^2]  + (1 - rho) g^2
    u        = sqrt(E[dx^2] + eps) / sqrt(E[g^2] + eps) * g
    E[dx^2] <- rho E[dx^2] + (1 - rho) u^2
    x       <- x - lr * u

Note what the literal setting implies: the first updates are about
sqrt(eps) * lr = 1e-4 * 1e-5 per step, so lr 1e-5 barely moves the weights
(about 1e-4 in 9k steps on a logistic regression). Paper configs keep it, and
say so; the demo uses a learning rate that learns.
"""

from __future__ import annotations

import optax

TF_ADADELTA_RHO = 0.95
TF_ADADELTA_EPSILON = 1e-8
PAPER_LEARNING_RATE = 1e-5


def adadelta(learning_rate=PAPER_LEARNING_RATE, rho: float = TF_ADADELTA_RHO,
             epsilon: float = TF_ADADELTA_EPSILON
             ) -> optax.GradientTransformation:
  """Adadelta with TensorFlow's semantics and defaults (see module doc)."""
  return optax.adadelta(learning_rate=learning_rate, rho=rho, eps=epsilon)


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


def from_config(config) -> optax.GradientTransformation:
  """The config's optimizer at its learning-rate schedule."""
  kwargs = ({"rho": config.adadelta_rho, "epsilon": config.adadelta_epsilon}
            if config.optimizer == "adadelta" else {})
  return build_optimizer(config.optimizer, learning_rate_schedule(config),
                         **kwargs)


def build_optimizer(name: str, learning_rate, **kwargs
                    ) -> optax.GradientTransformation:
  """The optimizer named in a config: adadelta, adam, sgd or momentum."""
  if name == "adadelta":
    return adadelta(learning_rate, **kwargs)
  if name == "adam":
    return optax.adam(learning_rate, **kwargs)
  if name == "sgd":
    return optax.sgd(learning_rate, **kwargs)
  if name == "momentum":
    return optax.sgd(learning_rate, momentum=kwargs.pop("momentum", 0.9),
                     **kwargs)
  raise ValueError(f"unknown optimizer {name!r} (config.optimizer); choose "
                   f"adadelta, adam, sgd or momentum")
