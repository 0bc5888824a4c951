"""A ResNet forward pass in PyTorch built from torch.nn.functional primitives, reading a
torchvision-format state dict: the reference the converted Flax model must match. Written from
torchvision's architecture description (v1.5), independently of gattanet_jax."""

import torch
import torch.nn.functional as F


def _bn(x, sd, prefix):
    return F.batch_norm(
        x,
        sd[f"{prefix}.running_mean"],
        sd[f"{prefix}.running_var"],
        sd[f"{prefix}.weight"],
        sd[f"{prefix}.bias"],
        training=False,
        eps=1e-5,
    )


def _block(x, sd, prefix, stride, bottleneck):
    identity = x
    if bottleneck:
        y = F.relu(_bn(F.conv2d(x, sd[f"{prefix}.conv1.weight"]), sd, f"{prefix}.bn1"))
        y = F.conv2d(y, sd[f"{prefix}.conv2.weight"], stride=stride, padding=1)
        y = F.relu(_bn(y, sd, f"{prefix}.bn2"))
        y = _bn(F.conv2d(y, sd[f"{prefix}.conv3.weight"]), sd, f"{prefix}.bn3")
    else:
        y = F.conv2d(x, sd[f"{prefix}.conv1.weight"], stride=stride, padding=1)
        y = F.relu(_bn(y, sd, f"{prefix}.bn1"))
        y = _bn(F.conv2d(y, sd[f"{prefix}.conv2.weight"], padding=1), sd, f"{prefix}.bn2")
    if f"{prefix}.downsample.0.weight" in sd:
        identity = F.conv2d(x, sd[f"{prefix}.downsample.0.weight"], stride=stride)
        identity = _bn(identity, sd, f"{prefix}.downsample.1")
    return F.relu(y + identity)


def forward(sd, images_nhwc, stage_sizes, bottleneck, mean, std):
    """Logits of torchvision's ResNet for images in [0, 1] (N, H, W, 3)."""
    sd = {k: torch.as_tensor(v) for k, v in sd.items()}
    x = torch.as_tensor(images_nhwc).permute(0, 3, 1, 2)
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    x = F.relu(_bn(F.conv2d(x, sd["conv1.weight"], stride=2, padding=3), sd, "bn1"))
    x = F.max_pool2d(x, 3, stride=2, padding=1)
    for i, n in enumerate(stage_sizes):
        for j in range(n):
            stride = 2 if (i > 0 and j == 0) else 1
            x = _block(x, sd, f"layer{i + 1}.{j}", stride, bottleneck)
    x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
    return F.linear(x, sd["fc.weight"], sd["fc.bias"]).numpy()
