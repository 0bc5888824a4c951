"""ResNet18 / ResNet50 as NNX modules: ``backbones.resnet.ResNet``'s architecture, module paths
(``stem/conv1``, ``layer2/0/downsample_conv``, ``avgpool``, ``fc``) and parameter names, so the
same torchvision weights load into either (``load_torchvision``) and give the same logits."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from gattanet_jax import weights
from gattanet_jax.backbones import resnet
from gattanet_jax.backbones.nnx_weights import load_linen_variables


def _conv(cin: int, cout: int, kernel: int, stride: int, dtype, rngs) -> nnx.Conv:
    pad = kernel // 2
    return nnx.Conv(
        cin, cout, (kernel, kernel), (stride, stride), padding=((pad, pad), (pad, pad)),
        use_bias=False, dtype=dtype, rngs=rngs,
    )  # fmt: skip


def _bn(features: int, dtype, rngs) -> nnx.BatchNorm:
    # torchvision's BatchNorm2d: eps 1e-5, running averages updated with momentum 0.1
    return nnx.BatchNorm(features, epsilon=1e-5, momentum=0.9, dtype=dtype, rngs=rngs)


class Stem(nnx.Module):
    def __init__(self, width: int, dtype, rngs):
        self.conv1, self.bn1 = _conv(3, width, 7, 2, dtype, rngs), _bn(width, dtype, rngs)

    def __call__(self, x):
        return nnx.relu(self.bn1(self.conv1(x)))


class Block(nnx.Module):
    """BasicBlock (two 3x3) or Bottleneck v1.5 (1x1, 3x3 with the stride, 1x1 at 4x)."""

    def __init__(self, cin: int, features: int, stride: int, bottleneck: bool, dtype, rngs):
        self.bottleneck = bottleneck
        out = features * (4 if bottleneck else 1)
        if bottleneck:
            self.conv1, self.bn1 = (
                _conv(cin, features, 1, 1, dtype, rngs),
                _bn(features, dtype, rngs),
            )
            self.conv2 = _conv(features, features, 3, stride, dtype, rngs)
            self.bn2 = _bn(features, dtype, rngs)
            self.conv3, self.bn3 = _conv(features, out, 1, 1, dtype, rngs), _bn(out, dtype, rngs)
        else:
            self.conv1 = _conv(cin, features, 3, stride, dtype, rngs)
            self.bn1 = _bn(features, dtype, rngs)
            self.conv2, self.bn2 = _conv(features, out, 3, 1, dtype, rngs), _bn(out, dtype, rngs)
        self.shortcut = not (stride == 1 and cin == out)
        if self.shortcut:
            self.downsample_conv = _conv(cin, out, 1, stride, dtype, rngs)
            self.downsample_bn = _bn(out, dtype, rngs)

    def __call__(self, x):
        y = nnx.relu(self.bn1(self.conv1(x)))
        if self.bottleneck:
            y = nnx.relu(self.bn2(self.conv2(y)))
            y = self.bn3(self.conv3(y))
        else:
            y = self.bn2(self.conv2(y))
        skip = self.downsample_bn(self.downsample_conv(x)) if self.shortcut else x
        return nnx.relu(y + skip)


class Stage(nnx.List):
    """torchvision's ``layerN``: blocks '0', '1', ... (list indices), called in turn."""

    def __call__(self, x):
        for block in self:
            x = block(x)
        return x


class GlobalAvgPool(nnx.Module):
    """(B, H, W, C) -> (B, C); a module so it can be a site."""

    def __call__(self, x):
        return jnp.mean(x, axis=(1, 2))


class ResNet(nnx.Module):
    """A torchvision-style ResNet in NNX (the fields of ``backbones.resnet.ResNet``)."""

    def __init__(
        self,
        stage_sizes: Sequence[int] = (2, 2, 2, 2),
        block: str = "basic",
        num_classes: int = 1000,
        width: int = 64,
        mean: Sequence[float] | None = resnet.IMAGENET_MEAN,
        std: Sequence[float] | None = resnet.IMAGENET_STD,
        dtype=jnp.float32,
        *,
        rngs: nnx.Rngs,
    ):
        if block not in resnet.BLOCKS:
            raise ValueError(f"ResNet block must be one of {sorted(resnet.BLOCKS)}, got {block!r}")
        bottleneck = block == "bottleneck"
        # the Linen twin: what torchvision weights are converted against
        self.linen = resnet.ResNet(
            tuple(stage_sizes),
            block,
            num_classes,
            width,
            None if mean is None else tuple(mean),
            None if std is None else tuple(std),
            dtype,
        )  # fmt: skip
        self.mean, self.std, self.dtype = mean, std, dtype
        self.stem = Stem(width, dtype, rngs)
        cin = width
        for i, n in enumerate(stage_sizes):
            features = width * 2**i
            blocks = []
            for j in range(n):
                stride = (1 if i == 0 else 2) if j == 0 else 1
                blocks.append(Block(cin, features, stride, bottleneck, dtype, rngs))
                cin = features * (4 if bottleneck else 1)
            setattr(self, f"layer{i + 1}", Stage(blocks))
        self.num_stages = len(stage_sizes)
        self.avgpool = GlobalAvgPool()
        self.fc = nnx.Linear(cin, num_classes, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        if self.mean is not None:
            x = (x - jnp.asarray(self.mean, x.dtype)) / jnp.asarray(self.std, x.dtype)
        x = self.stem(x.astype(self.dtype))
        x = jax.lax.reduce_window(
            x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), ((0, 0), (1, 1), (1, 1), (0, 0))
        )  # torchvision's maxpool 3x3/2, padding 1
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(self.avgpool(x))


def load_torchvision(model: ResNet, state_dict, image_size: int = 224) -> None:
    """Loads a torchvision-format state dict (``weights.read_state_dict``) into ``model``: the
    same conversion and the same one-line error as the Linen ResNet's."""
    abstract = jax.eval_shape(
        lambda: model.linen.init(jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)))
    )
    load_linen_variables(model, weights.from_torchvision(state_dict, abstract, resnet.torch_name))
