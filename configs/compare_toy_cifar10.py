r"""GAttANet and the systems it is compared with, on the toy CIFAR-10 setup.

``--config configs/compare_toy_cifar10.py:<system>[,scratch][,smoke]``

Protocol (a), an add-on to a frozen pretrained backbone (only the added parameters train, with
the attention_training recipe of configs/toy_cifar10.py: Adam 1e-3, L2 1e-5, batch 128):

  gattanet  GAttANet, d = 16                                     15,845 parameters
  gala      GALA after each conv block, reduction 4, tanh         17,195
  se        SE after each conv block, reduction 3                 14,601
  gsa       a residual GSA module after each conv block,          16,866
            GSA at C/4 channels

Controls that keep GAttANet and remove the agreement of an image with itself (its global
query no longer comes from its own queries): ``learned_q``, one trained vector as every
image's q_avg (15,861 parameters); ``shifted_q``, the q_avg of the previous image in the
batch, in training and test (15,845).

(``python -m train.summary --config configs/compare_toy_cifar10.py:<system>`` prints each count:
all within 10 % of GAttANet's.) GALA and SE use the residual gate Y = (1 + gamma s) X and GSA a
zero-initialised output projection, so every add-on starts as the frozen backbone, as GAttANet
(alpha = 0) does; ``--config.addon.gate=direct`` gives the papers' Y = s X.

  python -m train.main --config configs/compare_toy_cifar10.py:gala \
      --config.backbone_checkpoint=workdirs/toy10_backbone --workdir workdirs/toy10_gala

Protocol (b), ``:<system>,scratch``: backbone and modules trained together from scratch (the
backbone_training recipe): ``baseline`` (the plain toy CNN), ``gala``, ``se``, and ``gsa`` (the
GSA toy CNN: its three convolutions replaced by GSA modules, 8 heads, followed by the ReLU the
convolutions had).

``python -m train.compare`` runs protocol (a) for several backbones and tabulates the results.
"""

import ml_collections

from configs import toy_cifar10

SYSTEMS = ("gattanet", "gala", "se", "gsa")
# GAttANet with config.attention.q_avg_source set to a control's.
CONTROLS = {"learned_q": "learned", "shifted_q": "shifted"}
# The words of ``:<arg>`` (for --help): a system, 'scratch' and the toy config's own.
SCRATCH_SYSTEMS = ("baseline", "gala", "se", "gsa")
VARIANTS = (*SYSTEMS, *CONTROLS, "<system>,scratch", "baseline,scratch", "smoke")
# Reductions that put each add-on within 10 % of GAttANet d = 16's 15,845 parameters.
REDUCTION = {"gala": 4, "se": 3, "gsa": 4}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    words = [w for w in (arg or "").split(",") if w]
    scratch = "scratch" in words
    rest = [w for w in words if w in toy_cifar10.ARGS]  # 'smoke'
    named = [w for w in words if w != "scratch" and w not in toy_cifar10.ARGS]
    system = named[0] if named else ("baseline" if scratch else "gattanet")
    if len(named) > 1:
        raise ValueError(f"one system at a time, got {named}")
    known = SCRATCH_SYSTEMS if scratch else (*SYSTEMS, *CONTROLS)
    if system not in known:
        protocol = "from scratch" if scratch else "as add-ons"
        raise ValueError(f"unknown system {system!r}; {protocol}: {', '.join(known)}")
    config = toy_cifar10.get_config()
    if system == "gattanet" or system in CONTROLS:
        config.stage = "attention"
        config.attention.q_avg_source = CONTROLS.get(system, "own")
    elif system == "baseline":
        config.stage = "backbone"
    else:
        config.stage = "addon"
        config.addon.kind = "gsa_conv" if (system == "gsa" and scratch) else system
        config.addon.reduction = REDUCTION[system]
        config.addon.from_scratch = scratch
        config.addon.sites = ("conv1", "conv2", "conv3")
    if rest:
        toy_cifar10.apply_arg(config, ",".join(rest))
    return config
