"""The attention systems GAttANet is compared with: GALA (and SE, its global-only case) and GSA.

Unlike GAttANet's separate two-pass system, these are feed-forward modules that sit inside the
backbone. Insertion into the toy CNN and ResNets and the comparison protocols are issue 10's
remaining work.
"""

from gattanet_jax.systems.gala import GALA, SqueezeExcitation
from gattanet_jax.systems.gsa import GSA, ResidualGSA, content_attention, positional_attention

__all__ = [
    "GALA",
    "GSA",
    "ResidualGSA",
    "SqueezeExcitation",
    "content_attention",
    "positional_attention",
]
