"""The attention systems GAttANet is compared with: GALA (and SE, its global-only case) and GSA.

Unlike GAttANet's separate two-pass system, these are feed-forward modules that sit inside the
backbone: ``gattanet_jax.addon`` attaches them at sites (after a toy conv block, before a ResNet
block's residual addition) or puts GSA in place of convolutions, without touching the backbone's
code.
"""

from gattanet_jax.systems.gala import GALA, GATES, SqueezeExcitation
from gattanet_jax.systems.gsa import (
    GSA,
    GSAConv,
    ResidualGSA,
    content_attention,
    positional_attention,
)

__all__ = [
    "GALA",
    "GATES",
    "GSA",
    "GSAConv",
    "ResidualGSA",
    "SqueezeExcitation",
    "content_attention",
    "positional_attention",
]
