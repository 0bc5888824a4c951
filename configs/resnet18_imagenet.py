r"""GAttANet on a frozen, pretrained ResNet18 on ImageNet (Table 1, ResNet18 rows: d = 8/16/32).

The same recipe as configs/resnet50_imagenet.py (see there):

  python -m train.main --config configs/resnet18_imagenet.py --workdir workdirs/r18_d8 \
      --config.backbone_checkpoint=resnet18-f37072fd.pth --config.attention.d=8
"""

import ml_collections

from configs import resnet50_imagenet

VARIANTS = ("tiny", "smoke")  # the words of ``:<arg>`` (for --help)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return resnet50_imagenet.imagenet_config("resnet18", arg)
