"""Builds the backbone and the attention system from a config."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from gattanet_jax import AttentionSystem, ToyCNN, resolve_sites
from gattanet_jax.backbones import resnet
from gattanet_jax.nnx_backbone import NNXBackbone
from gattanet_jax.sites import SiteSpec
from train.errors import UserError

BACKBONES = ("toy", "resnet18", "resnet50")
APIS = ("linen", "nnx")  # model.api: the Flax API the backbone is written in

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def image_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
    return tuple(config.dataset.image_shape)


def build_backbone(config: ml_collections.ConfigDict):
    """The backbone of ``config.model``: a Linen module, or (``model.api='nnx'``) the NNX twin
    of the same architecture and parameter names driven through Linen's functional interface
    (``NNXBackbone``), so that every loop, checkpoint and weight file serves both."""
    m = config.model
    if m.dtype not in DTYPES:
        raise UserError(f"config.model.dtype must be one of {sorted(DTYPES)}, got {m.dtype!r}")
    if m.api == "nnx":
        return _nnx_backbone(config)
    if m.api != "linen":
        raise UserError(f"config.model.api must be one of {APIS}, got {m.api!r}")
    if m.backbone == "toy":
        return ToyCNN(**_toy_fields(config))
    if m.backbone in resnet.ARCHITECTURES:
        overrides = {"stage_sizes": tuple(m.stage_sizes)} if m.stage_sizes else {}
        return resnet.ARCHITECTURES[m.backbone](
            num_classes=config.dataset.num_classes,
            width=m.width,
            dtype=DTYPES[m.dtype],
            **overrides,
        )
    raise UserError(f"config.model.backbone must be one of {BACKBONES}, got {m.backbone!r}")


def _toy_fields(config: ml_collections.ConfigDict) -> dict:
    """The toy CNN's fields from the config (the Linen module's and its NNX twin's)."""
    m = config.model
    return dict(
        num_classes=config.dataset.num_classes,
        features=tuple(m.features),
        hidden=m.hidden,
        dropout_rate=m.dropout_rate,
        dropout_after=m.dropout_after,
        dtype=DTYPES[m.dtype],
        kernel_init=m.kernel_init,
        pixel_scale=float(m.pixel_scale),
    )


def _nnx_backbone(config: ml_collections.ConfigDict) -> NNXBackbone:
    from gattanet_jax.backbones import resnet_nnx, toy_nnx

    m = config.model
    height, _, channels = image_shape(config)
    if m.backbone == "toy":
        fields = _toy_fields(config)
        return NNXBackbone(
            lambda rngs: toy_nnx.ToyCNN(
                **fields, image_size=height, in_channels=channels, rngs=rngs
            )
        )
    if m.backbone in resnet.ARCHITECTURES:
        linen = resnet.ARCHITECTURES[m.backbone](num_classes=1)  # the architecture's fields
        stage_sizes = tuple(m.stage_sizes) if m.stage_sizes else linen.stage_sizes
        return NNXBackbone(
            lambda rngs: resnet_nnx.ResNet(
                stage_sizes,
                linen.block,
                config.dataset.num_classes,
                m.width,
                dtype=DTYPES[m.dtype],
                rngs=rngs,
            )
        )
    raise UserError(f"config.model.backbone must be one of {BACKBONES}, got {m.backbone!r}")


def torch_module_name(config: ml_collections.ConfigDict):
    """Flax module path -> torchvision state-dict prefix, for converting pretrained weights."""
    if config.model.backbone in resnet.ARCHITECTURES:
        return resnet.torch_name
    return lambda path: ".".join(path)


def backbone_shapes(backbone, config: ml_collections.ConfigDict):
    """The backbone's variables as shapes only (no computation)."""
    x = jnp.zeros((1, *image_shape(config)), jnp.float32)
    return jax.eval_shape(lambda: backbone.init(jax.random.key(0), x))


def build_attention(config: ml_collections.ConfigDict, backbone, backbone_vars) -> AttentionSystem:
    """The attention system over ``config.model.sites`` (the config's values are checked by
    train.validate.check_config); a bad site list is a UserError."""
    a = config.attention
    try:
        sites: tuple[SiteSpec, ...] = resolve_sites(
            backbone, backbone_vars, image_shape(config), tuple(config.model.sites)
        )
    except ValueError as e:
        raise UserError(f"config.model.sites: {e}") from None
    heads = a.heads
    bad = [f"{s.name} ({s.channels})" for s in sites if s.channels % heads]
    if bad:
        raise UserError(
            f"config.attention.heads={heads} must divide the channels of every site: {bad}"
        )
    if heads > 1 and (a.batch_norm_kq or a.layer_norm_gatta):
        raise UserError(
            "config.attention.heads > 1 does not support batch_norm_kq/layer_norm_gatta"
        )
    return AttentionSystem(
        sites,
        d=a.d,
        dropout_rate=a.dropout_rate,
        alpha_init=a.alpha_init,
        batch_norm_kq=a.batch_norm_kq,
        layer_norm_gatta=a.layer_norm_gatta,
        iterations=a.iterations,
        bounded=a.bounded,
        cue_classes=config.dataset.num_classes if a.cue_classes else 0,
        heads=a.heads,
        q_avg_source=a.q_avg_source,
    )


ADDON_KINDS = ("gala", "se", "gsa", "gsa_conv")


def build_addons(config: ml_collections.ConfigDict, backbone, backbone_vars):
    """The comparison system of ``config.addon`` at its sites: GALA, SE or a residual GSA after
    each site, or ('gsa_conv') GSA modules in place of the sites' convolutions."""
    from gattanet_jax import addon
    from gattanet_jax.systems import GALA, GSAConv, ResidualGSA, SqueezeExcitation

    a = config.addon
    try:
        sites = resolve_sites(backbone, backbone_vars, image_shape(config), tuple(a.sites))
    except ValueError as e:
        raise UserError(f"config.addon.sites: {e}") from None
    bad = [s.name for s in sites if s.kind != "conv"]
    if bad:
        raise UserError(f"config.addon.sites: {bad} are not conv sites (B, H, W, C)")
    replace = a.kind == "gsa_conv"
    if replace:
        bad = [s.name for s in sites if s.input_shape is None or len(s.input_shape) != 3]
        if bad:
            raise UserError(f"config.addon.sites: {bad} do not take a (B, H, W, C) input")
    # The toy CNN's conv modules include their ReLU; a ResNet's convolutions do not.
    activation = "relu" if config.model.backbone == "toy" else "none"
    gate = a.gate

    def make(site, name):
        if a.kind == "gala":
            return GALA(a.reduction, a.squash, gate=gate, name=name)
        if a.kind == "se":
            return SqueezeExcitation(a.reduction, gate=gate, name=name)
        if a.kind == "gsa":
            return ResidualGSA(site.channels, a.heads, a.reduction, name=name)
        stride = site.input_shape[0] // site.shape[0]
        return GSAConv(site.channels, a.heads, stride, activation, name=name)

    return addon.addon_modules(sites, make, replace=replace)


def attention_from_shapes(config: ml_collections.ConfigDict, backbone) -> AttentionSystem:
    """build_attention without weights (shapes only): checks a config before data is read."""
    return build_attention(config, backbone, backbone_shapes(backbone, config))
