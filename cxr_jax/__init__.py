"""cxr_jax: DeepCXray (Xu et al., IEEE Access 2018) in JAX/Flax."""

__version__ = "0.1.0"
