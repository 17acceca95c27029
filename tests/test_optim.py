"""Our Adadelta follows Keras' (TensorFlow's) trajectory step for step."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cxr_jax import optim


def _quadratic_grad(x, a, b):
  return a * x + b  # gradient of 0.5 a x^2 + b x


@pytest.mark.parametrize("lr,rho,eps", [(1e-5, 0.95, 1e-8), (1.0, 0.95, 1e-7),
                                        (0.5, 0.9, 1e-6)])
def test_adadelta_matches_keras_for_20_steps(lr, rho, eps):
  keras = pytest.importorskip("keras")
  rng = np.random.default_rng(0)
  a = rng.uniform(0.5, 3.0, 6).astype(np.float32)
  b = rng.normal(size=6).astype(np.float32)
  # The paper's lr moves a weight by ~1e-8 in 20 steps, below float32's
  # resolution at |x| ~ 1; starting at 0 keeps that displacement visible.
  x0 = rng.normal(size=6).astype(np.float32) * (lr >= 0.1)

  var = keras.Variable(x0.copy())
  k_opt = keras.optimizers.Adadelta(learning_rate=lr, rho=rho, epsilon=eps)
  k_traj = []
  for _ in range(20):
    g = _quadratic_grad(np.asarray(var.value), a, b)
    k_opt.apply_gradients([(keras.ops.convert_to_tensor(g), var)])
    k_traj.append(np.asarray(var.value).copy())

  opt = optim.adadelta(lr, rho=rho, epsilon=eps)
  x = jnp.asarray(x0)
  state = opt.init(x)
  ours = []
  for _ in range(20):
    updates, state = opt.update(_quadratic_grad(x, a, b), state, x)
    x = optax.apply_updates(x, updates)
    ours.append(np.asarray(x))
  moved = np.abs(np.array(k_traj[-1]) - x0).max()
  assert moved > 0
  np.testing.assert_allclose(np.array(ours), np.array(k_traj), rtol=1e-6,
                             atol=1e-7 * max(moved, 1e-3))


def test_paper_defaults_are_tensorflows():
  assert (optim.TF_ADADELTA_RHO, optim.TF_ADADELTA_EPSILON,
          optim.PAPER_LEARNING_RATE) == (0.95, 1e-8, 1e-5)
  # the literal paper setting barely moves a weight: about sqrt(eps) * lr
  opt = optim.adadelta()
  x = jnp.ones(3)
  state = opt.init(x)
  updates, _ = opt.update(jnp.ones(3), state, x)
  np.testing.assert_allclose(np.abs(np.asarray(updates)),
                             1e-5 * np.sqrt(1e-8) / np.sqrt(0.05 + 1e-8),
                             rtol=1e-4)
  with pytest.raises(ValueError, match="unknown optimizer 'lamb'"):
    optim.build_optimizer("lamb", 1e-3)
