"""ResNet18 / ResNet50 as plain Flax modules, with torchvision's architecture (v1.5).

The layout and names follow torchvision's ``resnet18`` / ``resnet50``, so that a torchvision
state dict maps onto the variable tree name by name (``gattanet_jax.weights``):

  stem      conv1 7x7/2 (no bias), bn1, ReLU             -> (112, 112, 64) at 224 px
  maxpool   3x3/2, padding 1
  layer1-4  stages of BasicBlocks (ResNet18) or Bottlenecks (ResNet50); the stride of a
            Bottleneck sits in its 3x3 convolution (v1.5); downsample = conv1x1/s + BN
  avgpool   global average pooling                        -> (512,) or (2048,)
  fc        dense, the logits

Paddings are explicit (1 for 3x3, 3 for 7x7) as in torchvision, not 'SAME' (which pads
asymmetrically at stride 2). BatchNorm uses stored statistics unless ``train`` (then the caller
passes ``mutable=['batch_stats']``); a frozen backbone always runs with ``train=False``.

The input is an image in [0, 1] like every backbone here; the module subtracts ``mean`` and
divides by ``std`` (ImageNet's by default, what torchvision weights expect) before the stem.

Default attention sites (the paper's six): the stem output, the outputs of stages 1-3, the pooled
features and the logits: ``RESNET_SITES``. Any module path can be a site instead.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESNET_SITES = ("stem", "layer1", "layer2", "layer3", "avgpool", "fc")

# torchvision's BatchNorm2d: eps 1e-5, running averages updated with momentum 0.1.
_BatchNorm = functools.partial(nn.BatchNorm, epsilon=1e-5, momentum=0.9)


def _conv(features: int, kernel: int, stride: int, dtype, name: str) -> nn.Conv:
    pad = kernel // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        (stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        dtype=dtype,
        name=name,
    )


class Stem(nn.Module):
    """conv1 7x7/2 -> bn1 -> ReLU (torchvision's ``conv1``, ``bn1``, ``relu``)."""

    width: int = 64
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = _conv(self.width, 7, 2, self.dtype, "conv1")(x)
        x = _BatchNorm(use_running_average=not train, dtype=self.dtype, name="bn1")(x)
        return nn.relu(x)


class BasicBlock(nn.Module):
    """ResNet18/34's block: two 3x3 convolutions (expansion 1)."""

    features: int
    stride: int = 1
    dtype: jnp.dtype = jnp.float32
    expansion = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        bn = functools.partial(_BatchNorm, use_running_average=not train, dtype=self.dtype)
        y = _conv(self.features, 3, self.stride, self.dtype, "conv1")(x)
        y = nn.relu(bn(name="bn1")(y))
        y = _conv(self.features, 3, 1, self.dtype, "conv2")(y)
        y = bn(name="bn2")(y)
        return nn.relu(y + _shortcut(x, self.features, self.stride, self.dtype, bn))


class Bottleneck(nn.Module):
    """ResNet50's block, v1.5: 1x1 -> 3x3 (with the stride) -> 1x1 (4x the width)."""

    features: int
    stride: int = 1
    dtype: jnp.dtype = jnp.float32
    expansion = 4

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        bn = functools.partial(_BatchNorm, use_running_average=not train, dtype=self.dtype)
        y = _conv(self.features, 1, 1, self.dtype, "conv1")(x)
        y = nn.relu(bn(name="bn1")(y))
        y = _conv(self.features, 3, self.stride, self.dtype, "conv2")(y)
        y = nn.relu(bn(name="bn2")(y))
        y = _conv(self.features * 4, 1, 1, self.dtype, "conv3")(y)
        y = bn(name="bn3")(y)
        return nn.relu(y + _shortcut(x, self.features * 4, self.stride, self.dtype, bn))


def _shortcut(x, out_features: int, stride: int, dtype, bn) -> jax.Array:
    """Identity, or torchvision's ``downsample`` (conv1x1/stride + BN) where the shape changes.
    Called inside a block's compact ``__call__``, so the modules belong to the block."""
    if stride == 1 and x.shape[-1] == out_features:
        return x
    y = _conv(out_features, 1, stride, dtype, "downsample_conv")(x)
    return bn(name="downsample_bn")(y)


class Stage(nn.Module):
    """torchvision's ``layerN``: blocks named '0', '1', ...; the first one carries the stride."""

    block: str
    features: int
    num_blocks: int
    stride: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        cls = BLOCKS[self.block]
        for i in range(self.num_blocks):
            stride = self.stride if i == 0 else 1
            x = cls(self.features, stride, self.dtype, name=str(i))(x, train)
        return x


class GlobalAvgPool(nn.Module):
    """torchvision's ``avgpool`` + flatten: (B, H, W, C) -> (B, C). A module so it can be a site."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.mean(x, axis=(1, 2))


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet(nn.Module):
    """A torchvision-style ResNet.

    Attributes:
      stage_sizes: blocks per stage ((2, 2, 2, 2) ResNet18, (3, 4, 6, 3) ResNet50).
      block: 'basic' or 'bottleneck'.
      num_classes: units of ``fc``.
      width: channels of the stem and of stage 1's blocks (64); stage k has width * 2**(k-1).
      mean, std: input normalisation of [0, 1] images (per RGB channel); None skips it.
      dtype: computation dtype (parameters and BatchNorm statistics stay float32).
    """

    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    block: str = "basic"
    num_classes: int = 1000
    width: int = 64
    mean: Sequence[float] | None = IMAGENET_MEAN
    std: Sequence[float] | None = IMAGENET_STD
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.block not in BLOCKS:
            raise ValueError(f"ResNet block must be one of {sorted(BLOCKS)}, got {self.block!r}")
        if self.mean is not None:
            x = (x - jnp.asarray(self.mean, x.dtype)) / jnp.asarray(self.std, x.dtype)
        x = x.astype(self.dtype)
        x = Stem(self.width, self.dtype, name="stem")(x, train)
        x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
        for i, n in enumerate(self.stage_sizes):
            stride = 1 if i == 0 else 2
            x = Stage(self.block, self.width * 2**i, n, stride, self.dtype, name=f"layer{i + 1}")(
                x, train
            )
        x = GlobalAvgPool(name="avgpool")(x)
        return nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x)


def resnet18(**kwargs) -> ResNet:
    """ResNet18; keyword arguments override the ResNet fields (e.g. a smaller ``width``)."""
    return ResNet(**{"stage_sizes": (2, 2, 2, 2), "block": "basic", **kwargs})


def resnet50(**kwargs) -> ResNet:
    """ResNet50 (v1.5); keyword arguments override the ResNet fields."""
    return ResNet(**{"stage_sizes": (3, 4, 6, 3), "block": "bottleneck", **kwargs})


ARCHITECTURES = {"resnet18": resnet18, "resnet50": resnet50}


def torch_name(path: Sequence[str]) -> str:
    """The torchvision state-dict prefix of a Flax module path: ('stem', 'bn1') -> 'bn1',
    ('layer2', '0', 'downsample_conv') -> 'layer2.0.downsample.0'."""
    parts = list(path)
    if parts and parts[0] == "stem":
        parts = parts[1:]
    rename = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}
    return ".".join(rename.get(p, p) for p in parts)
