"""The two-pass GAttANet forward as a pure function of (attention variables, backbone variables,
images).

Pass 1 runs the frozen backbone unmodulated and records every site's output; the attention system
turns those into keys, queries, q_avg and agreement maps. Pass 2 runs the backbone again with
every site's output multiplied by (1 + alpha_i * gatta_i). The logits of pass 2 are the prediction.

Gradients flow only into the attention variables: the backbone's variables and the pass-1
activations are wrapped in ``stop_gradient``, so differentiating this function costs a backward
pass for input gradients through pass 2 and nothing more.

Beyond the paper (``iterations`` T > 1): keys and queries are recomputed from the *modulated*
site outputs of modulated pass t to modulate pass t + 1; T = 1 is the paper's model. Gradients
then flow through every modulated pass.

Joint fine-tuning (``train_backbone=True``): the backbone's variables and the pass-1 activations
are no longer constants, so gradients reach the backbone's parameters through every pass; its
BatchNorm statistics stay as stored unless ``backbone_batch_stats='update'`` (see ``two_pass``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp

from gattanet_jax import agreement as agr
from gattanet_jax import dropout, nnx_sites
from gattanet_jax import sites as sites_lib
from gattanet_jax.attention import Attention, AttentionSystem


@flax.struct.dataclass
class Output:
    """What ``two_pass`` returns. ``attention`` is None unless internals were requested;
    ``updates`` holds new values of the attention system's non-parameter collections (e.g. batch
    statistics) after a training pass, and is empty otherwise."""

    logits: jax.Array
    attention: Attention | None
    updates: dict
    backbone_updates: dict = flax.struct.field(default_factory=dict)


def _lesion_factors(lesion, sites: Sequence[sites_lib.SiteSpec]):
    """Static per-site flags for a lesion string, or a traced (n_sites,) mask for an array."""
    if lesion is None or isinstance(lesion, str):
        return sites_lib.lesion_mask(lesion, sites), None
    mask = jnp.asarray(lesion, jnp.float32)
    if mask.shape != (len(sites),):
        raise ValueError(f"a lesion mask must have shape ({len(sites)},), got {mask.shape}")
    return (True,) * len(sites), mask


def two_pass(
    backbone,
    attention: AttentionSystem,
    attention_vars,
    backbone_vars,
    images: jax.Array,
    *,
    train: bool = False,
    rng: jax.Array | None = None,
    lesion: str | jax.Array | None = None,
    return_internals: bool = False,
    iterations: int | None = None,
    cue: jax.Array | None = None,
    cue_weight=0.0,
    train_backbone: bool = False,
    backbone_batch_stats: str = "frozen",
) -> Output:
    """GAttANet's two-pass forward.

    Args:
      backbone: a Linen module called as ``backbone.apply(vars, images, train=False)``, or an
        NNX model's graph definition (``graphdef, state = nnx.split(model)``; ``backbone_vars``
        is then its state, and it is called as ``model(images)`` after ``model.eval()``); it is
        run in inference mode (frozen: no dropout, stored batch statistics) in both passes.
      attention: the attention system; its ``sites`` are module paths of the backbone.
      attention_vars: the attention system's variables (``init_attention``).
      backbone_vars: the backbone's variables.
      images: (B, H, W, C) input batch.
      train: enables key/query dropout (and updates of attention batch statistics).
      rng: PRNG key for the dropout; needed when ``train`` and the dropout rate is above 0.
        One key, or one key per image (B,): each image's key/query dropout then depends on its
        own key alone, so a data-parallel shard given its slice of the keys computes exactly
        its part of the whole batch's result.
      lesion: the paper's notation, one character per site ('cccdd', 'c.cdd', '.....'): '.'
        removes a site's modulation (its query still enters q_avg). A float array of shape
        (n_sites,) does the same inside a trace (1 = modulated, 0 = removed), e.g. under vmap.
      return_internals: also return keys, queries, q_avg, gatta and alpha per site.
      iterations: modulated passes T (default: ``attention.iterations``; the paper: 1). Pass
        t + 1 is modulated by the agreement computed from pass t's modulated site outputs (same
        attention parameters every time; dropout redrawn per iteration; BatchNorm statistics
        updated by each in turn).
      cue, cue_weight: a top-down cue mixed into every iteration's global query (see
        ``AttentionSystem.__call__``); ``cue=None`` or weight 0 is the uncued model.
      train_backbone: joint fine-tuning: gradients reach ``backbone_vars['params']``.
      backbone_batch_stats: with ``train_backbone`` and ``train``: 'frozen' (every pass
        normalises with the stored statistics, which stay as they are: the usual choice for
        fine-tuning with small batches) or 'update' (every pass runs the backbone in training
        mode, with batch statistics, and dropout drawn from ``rng``; the running averages of
        the last pass are returned in ``Output.backbone_updates``).
    """
    if backbone_batch_stats not in ("frozen", "update"):
        raise ValueError(
            f"backbone_batch_stats must be 'frozen' or 'update', got {backbone_batch_stats!r}"
        )
    iterations = attention.iterations if iterations is None else iterations
    if not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be a positive integer, got {iterations!r}")
    if train and attention.dropout_rate > 0 and rng is None:
        raise ValueError("two_pass(train=True) needs an rng for key/query dropout")
    sites = attention.sites
    names = [s.name for s in sites]
    flags, mask = _lesion_factors(lesion, sites)
    if not train_backbone:
        backbone_vars = jax.lax.stop_gradient(backbone_vars)
    update_stats = train and train_backbone and backbone_batch_stats == "update"
    if update_stats:
        run_backbone = functools.partial(_backbone_in_training_mode, backbone, rng)
    else:
        run_backbone = functools.partial(_backbone_frozen, backbone)
    backbone_updates = {}

    # Pass 1: unmodulated; its activations are constants for the attention system (unless the
    # backbone is fine-tuned with it).
    (_, backbone_updates), acts = _modulated_pass(run_backbone, backbone_vars, images, {}, names, 0)
    if not train_backbone:
        acts = jax.lax.stop_gradient(acts)

    mutable = [c for c in attention_vars if c != "params"] if train else []

    def run_attention(attention_vars, acts, key):
        per_example = key is not None and jnp.ndim(key) == 1
        return attention.apply(
            attention_vars,
            acts,
            train=train,
            internals=return_internals,
            cue=cue,
            cue_weight=cue_weight,
            dropout_keys=key if per_example else None,
            rngs={"dropout": key} if key is not None and not per_example else {},
            mutable=mutable or False,
        )

    result = run_attention(attention_vars, acts, rng)
    att, updates = result if mutable else (result, {})

    for t in range(iterations):
        factors = {}  # each modulated site's (1 + alpha * gatta)
        for i, (site, on) in enumerate(zip(sites, flags, strict=True)):
            if not on:
                continue
            alpha = att.alpha[site.name] if mask is None else att.alpha[site.name] * mask[i]
            if attention.heads > 1:
                f = agr.head_modulation(att.gatta[site.name], alpha, site.kind, site.channels)
            else:
                f = agr.modulation(att.gatta[site.name], alpha, site.kind)
            factors[site.name] = f
        last = t == iterations - 1
        (logits, backbone_updates), acts = _modulated_pass(
            run_backbone, backbone_vars, images, factors, [] if last else names, t + 1
        )
        if last:
            break
        # The next agreement comes from this pass's modulated site outputs.
        key = None if rng is None else dropout.fold_in(rng, t + 1)
        result = run_attention({**attention_vars, **updates}, acts, key)
        att, updates = result if mutable else (result, {})
    return Output(
        logits=logits,
        attention=att if return_internals else None,
        updates=updates,
        backbone_updates=backbone_updates,
    )


def _backbone_frozen(backbone, variables, images, index, names, fn):
    """((logits, {}), seen): inference mode (the paper's frozen backbone)."""
    del index
    out, seen = sites_lib.call(backbone, variables, images, names, fn)
    return (out, {}), seen


def _backbone_in_training_mode(backbone, rng, variables, images, index, names, fn):
    """((logits, new statistics), seen): training mode, batch statistics. Linen: dropout keys
    per pass (from the first image's key when ``rng`` holds one per image); NNX: the model's
    own ``nnx.Rngs``, and the new statistics are its whole state after the pass."""
    if nnx_sites.is_nnx(backbone):
        (logits, state), seen = sites_lib.call(
            backbone, variables, images, names, fn, train=True, mutable=True
        )
        return (logits, state), seen
    collections = [c for c in variables if c != "params"]
    if rng is not None and jnp.ndim(rng) == 1:
        rng = rng[0]
    rngs = {"dropout": jax.random.fold_in(rng, 1000 + index)} if rng is not None else {}
    out, seen = sites_lib.call(
        backbone, variables, images, names, fn, train=True, rngs=rngs, mutable=collections
    )
    if not collections:
        return (out, {}), seen
    logits, updates = out
    return (logits, dict(updates)), seen


def _modulated_pass(run_backbone, backbone_vars, images, factors: dict, record, index: int):
    """The backbone with each site in ``factors`` scaled by its factor; also returns the
    (modulated) outputs of the sites in ``record``."""
    acts = {}

    def scale(name, y):
        out = y * factors[name].astype(y.dtype) if name in factors else y
        if name in record:
            acts[name] = out
        return out

    names = list(dict.fromkeys([*factors, *record]))
    out, seen = run_backbone(backbone_vars, images, index, names, scale)
    sites_lib.check_seen(seen)
    return out, acts


def backbone_logits(backbone, backbone_vars, images: jax.Array) -> jax.Array:
    """The plain backbone's logits in inference mode, for comparison with ``two_pass``."""
    return sites_lib.call(backbone, backbone_vars, images, [], None)[0]
