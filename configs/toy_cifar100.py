r"""The paper's toy model on CIFAR-100 (Table 1, second row): both training stages.

  python -m train.prepare_data --source cifar-100-python.tar.gz --name local_cifar100
  python -m train.main --config configs/toy_cifar100.py --workdir workdirs/toy100_backbone \
      --config.stage=backbone
  python -m train.main --config configs/toy_cifar100.py --workdir workdirs/toy100_d16 \
      --config.backbone_checkpoint=workdirs/toy100_backbone --config.attention.d=16

Table 1 uses d = 16, 32 and 64 (``--config.attention.d``). Shrunk for a CPU check:
``--config configs/toy_cifar100.py:smoke``.
"""

import ml_collections

from configs import toy_cifar10

VARIANTS = ("smoke",)  # the words of ``:<arg>`` (for --help)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = toy_cifar10.get_config()
    config.dataset.name = "local_cifar100"
    config.dataset.num_classes = 100
    if arg:
        toy_cifar10.apply_arg(config, arg)
    return config
