"""GAttANet as an NNX module, for people who write NNX: the attention system's parameters beside
a frozen NNX backbone, in one module that ``nnx.jit`` and ``nnx.Optimizer`` take as they are.

The attention parameters are ``AttentionParam`` variables (a kind of ``nnx.Param``), so an
optimizer built with ``wrt=AttentionParam`` (and gradients taken with
``nnx.DiffState(0, AttentionParam)``) trains them alone; the backbone's state never changes.
The forward pass is the functional ``two_pass`` on the backbone's ``nnx.split`` state: the same
numbers as the Linen path and the functional call.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import nnx

from gattanet_jax.attention import AttentionSystem, init_attention
from gattanet_jax.gattanet import Output, two_pass
from gattanet_jax.sites import resolve_sites


class AttentionParam(nnx.Param):
    """A parameter of the attention system (what ``wrt=AttentionParam`` trains)."""


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


class GAttANet(nnx.Module):
    """A frozen NNX ``backbone`` with a GAttANet attention system at ``sites`` (graph paths or
    glob patterns, e.g. ``'blocks/*/bn'``).

    Args:
      backbone: the NNX model (kept as it is: its state is read, never written).
      sites: the attention sites.
      image_shape: (H, W, C) of the images, to find the sites' shapes.
      rngs: ``nnx.Rngs`` for the attention parameters and, in training, key/query dropout.
      **options: ``AttentionSystem``'s (``d``, ``dropout_rate``, ``iterations``, ...).
    """

    def __init__(
        self, backbone: nnx.Module, sites: Sequence[str], image_shape, *, rngs: nnx.Rngs, **options
    ):
        graphdef, state = nnx.split(backbone)
        self.backbone = backbone
        specs = resolve_sites(graphdef, state, image_shape, sites)
        self.attention = AttentionSystem(specs, **options)
        variables = init_attention(self.attention, rngs.params())
        self.attention_vars = nnx.data(
            {
                c: jax.tree.map(AttentionParam if c == "params" else nnx.BatchStat, tree)
                for c, tree in variables.items()
            }
        )
        self.rngs = rngs

    def variables(self) -> dict:
        """The attention system's variables as arrays (``two_pass``'s ``attention_vars``)."""
        return jax.tree.map(lambda v: v[...], self.attention_vars, is_leaf=_is_variable)

    def __call__(
        self,
        images: jax.Array,
        *,
        train: bool = False,
        lesion=None,
        return_internals: bool = False,
        **kwargs,
    ) -> jax.Array | Output:
        """The logits of the modulated pass (``return_internals``: ``two_pass``'s whole
        ``Output``); ``train`` turns key/query dropout on, with keys from ``rngs``."""
        graphdef, state = nnx.split(self.backbone)
        rng = self.rngs.dropout() if train and self.attention.dropout_rate > 0 else None
        out = two_pass(
            graphdef, self.attention, self.variables(), state, images, train=train, rng=rng,
            lesion=lesion, return_internals=return_internals, **kwargs,
        )  # fmt: skip
        for collection, tree in out.updates.items():  # e.g. the attention's batch statistics
            kept = jax.tree.leaves(self.attention_vars[collection], is_leaf=_is_variable)
            for variable, new in zip(kept, jax.tree.leaves(tree), strict=True):
                variable[...] = new
        return out if return_internals else out.logits
