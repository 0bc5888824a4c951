r"""Beyond the paper: GAttANet d = 16 on a frozen toy CIFAR-10 backbone, one extension on.

The toy CIFAR-10 setup of configs/toy_cifar10.py, with one extension switched on.

``--config configs/beyond_toy_cifar10.py:<variant>[,smoke]``

  t<T>        T modulated passes (t1 is the paper's model; t2, t3, ...), with bounded (tanh)
              agreement from T = 2 on: each pass's agreement comes from the previous pass's
              modulated activations
  t<T>free    the same without the tanh bound
  cue         top-down cues: a learned class embedding; half the training examples are cued
              with their true class at weight 0.5 (then: python -m train.analyze cues)
  heads<H>    H-head agreement (heads2: each head modulates half of every site's channels or
              units; H must divide every site's, the 10 logits included)
  finetune    joint fine-tuning: the backbone trains too, Adam 1e-5 (its own learning rate)

  python -m train.main --config configs/beyond_toy_cifar10.py:t2 \
      --config.backbone_checkpoint=workdirs/toy10_backbone --workdir workdirs/toy10_t2
"""

import re

import ml_collections

from configs import toy_cifar10

VARIANTS = ("t<T>", "t<T>free", "cue", "heads<H>", "finetune", "smoke")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    words = [w for w in (arg or "").split(",") if w]
    rest = [w for w in words if w in toy_cifar10.ARGS]  # 'smoke'
    named = [w for w in words if w not in toy_cifar10.ARGS]
    variant = named[0] if named else "t1"
    if len(named) > 1:
        raise ValueError(f"one variant at a time, got {named}")
    config = toy_cifar10.get_config()
    config.stage = "attention"
    a = config.attention
    if m := re.fullmatch(r"t(\d+)(free)?", variant):
        a.iterations = int(m.group(1))
        a.bounded = a.iterations > 1 and not m.group(2)
    elif m := re.fullmatch(r"heads(\d+)", variant):
        a.heads = int(m.group(1))
    elif variant == "cue":
        a.cue_classes = True
        a.cue_fraction = 0.5
        a.cue_weight = 0.5
    elif variant == "finetune":
        config.attention_training.finetune_backbone = True
    else:
        raise ValueError(f"unknown variant {variant!r}; known: {', '.join(VARIANTS[:-1])}")
    if rest:
        toy_cifar10.apply_arg(config, ",".join(rest))
    return config
