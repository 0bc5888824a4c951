"""Backbones: plain Flax modules with no attention code. Call as ``apply(vars, x, train=...)``."""

from gattanet_jax.backbones.toy import TOY_SITES, ToyCNN

__all__ = ["TOY_SITES", "ToyCNN"]
