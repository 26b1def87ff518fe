"""chimera_jax: JAX/Flax research code for the Chimera family of hybrid sequence models."""

__version__ = "0.1.0"
