"""gattanet-jax: GAttANet (VanRullen & Alamia 2021) in JAX/Flax.

The math is in ``agreement`` (pure functions over arrays), sites and the modulation interceptor in
``sites``, the attention system in ``attention``, and the two-pass forward in ``gattanet``.
"""

from gattanet_jax import agreement
from gattanet_jax.agreement import agreement as agreement_map
from gattanet_jax.agreement import conv_project, dense_project, global_query, modulate
from gattanet_jax.attention import (
    Attention,
    AttentionSystem,
    count_params,
    init_attention,
    site_alphas,
)
from gattanet_jax.backbones import TOY_SITES, ToyCNN
from gattanet_jax.gattanet import Output, backbone_logits, two_pass
from gattanet_jax.host_memory import keep_freed_host_memory
from gattanet_jax.nnx_module import AttentionParam, GAttANet
from gattanet_jax.sites import SiteSpec, available_sites, lesion_mask, resolve_sites

__all__ = [
    "TOY_SITES",
    "Attention",
    "AttentionParam",
    "AttentionSystem",
    "GAttANet",
    "Output",
    "SiteSpec",
    "ToyCNN",
    "agreement",
    "agreement_map",
    "available_sites",
    "backbone_logits",
    "conv_project",
    "count_params",
    "dense_project",
    "global_query",
    "init_attention",
    "keep_freed_host_memory",
    "lesion_mask",
    "modulate",
    "resolve_sites",
    "site_alphas",
    "two_pass",
]
