"""Every config field's default, in one place, merged into every config a run or a tool reads.

The defaults are the fields of the shipped configs themselves: ``configs/toy_cifar10.py`` for
the toy backbone, ``configs/resnet50_imagenet.py`` for the ResNets. ``complete`` adds each field
a config lacks (a user's own config file, or a workdir's ``config.json`` written before the
field existed) and never changes a value the config sets, so code reads ``config.x.y`` and
never repeats a default.
"""

from __future__ import annotations

import copy

import ml_collections

# Fields whose default differs from what a run did before the field existed: an older
# config.json without them gets the old behaviour, not today's default.
BEFORE_THE_FIELD = {("addon", "gate"): "direct"}


def defaults(backbone: str) -> dict:
    """The default config (a plain dict) for a backbone: 'toy' or a ResNet."""
    if backbone == "toy":
        from configs import toy_cifar10

        return toy_cifar10.get_config().to_dict()
    from configs import resnet50_imagenet

    return resnet50_imagenet.get_config().to_dict()


def complete(config: ml_collections.ConfigDict | dict) -> ml_collections.ConfigDict:
    """A new, unlocked config: ``config`` with every missing field set to its default."""
    tree = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config
    tree = copy.deepcopy(tree)
    for path, value in BEFORE_THE_FIELD.items():
        section = tree.get(path[0])
        if isinstance(section, dict) and path[1] not in section:
            section[path[1]] = value
    backbone = tree.get("model", {}).get("backbone", "toy")
    _fill(tree, defaults(backbone))
    return ml_collections.ConfigDict(tree)


def _fill(tree: dict, default: dict) -> None:
    for key, value in default.items():
        if key not in tree:
            tree[key] = copy.deepcopy(value)
        elif isinstance(value, dict) and isinstance(tree[key], dict):
            _fill(tree[key], value)
