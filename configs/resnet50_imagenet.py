r"""GAttANet on a frozen, pretrained ResNet50 on ImageNet (Table 1, last rows).

The paper's ResNet recipe (section 2.0.3): six sites (stem, stages 1-3, pooled features, logits),
BatchNorm on keys and queries, LayerNorm on the agreement maps, dropout 0.25 on keys and queries,
Adam lr 3e-4, batch 8, early stopping with patience 1 epoch, at most 10 epochs. d overridable
(Table 1: 4, 8, 16, 32, 64).

  python -m train.main --config configs/resnet50_imagenet.py --workdir workdirs/r50_d4 \
      --config.backbone_checkpoint=resnet50.pth --config.attention.d=4

``backbone_checkpoint`` is a torchvision-format state dict (.pth/.pt read with weights_only, or
.safetensors / .npz without torch), e.g. torchvision's ``resnet50-0676ba61.pth``, or a workdir of
this project. The data is tfds 'imagenet2012' prepared elsewhere (``tfds build imagenet2012
--file_format=array_record --manual_dir ...``) in ``--config.dataset.data_dir``; it is streamed,
not loaded into memory.
Parameter counts: ``python -m train.summary --config configs/resnet50_imagenet.py
--config.attention.d=4``. A tiny variant for a CPU check on mock data: ``:tiny``.
"""

import ml_collections

from configs import toy_cifar10

ARCH = "resnet50"


VARIANTS = ("tiny", "smoke")  # the words of ``:<arg>`` (for --help)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return imagenet_config(ARCH, arg)


def imagenet_config(arch: str, arg: str | None) -> ml_collections.ConfigDict:
    config = toy_cifar10.get_config()
    config.stage = "attention"

    ds = config.dataset
    ds.name = "imagenet2012"
    ds.num_classes = 1000
    ds.pipeline = "imagenet"  # streamed from the tfds source, preprocessed on the host
    ds.image_shape = (224, 224, 3)  # train: random-resized crop + flip; eval: centre crop
    ds.resize = 256  # eval: the shorter side is resized to this before the centre crop
    ds.test_split = "validation"  # ImageNet's labelled held-out set; early stopping uses...
    ds.validation_fraction = 0.01  # ...12,812 images held out of 'train'
    ds.workers = 16  # threads reading and preprocessing images

    m = config.model
    m.backbone = arch
    m.width = 64  # channels of the stem and of stage 1 (torchvision: 64)
    m.stage_sizes = ()  # blocks per stage; empty = the architecture's own
    m.sites = ("stem", "layer1", "layer2", "layer3", "avgpool", "fc")  # 'ccccdd'
    for toy_only in (
        "features",
        "hidden",
        "dropout_rate",
        "dropout_after",
        "kernel_init",
        "pixel_scale",
    ):
        del m[toy_only]

    # Comparison systems (stage='addon'): GALA/SE before each block's residual addition (its
    # last BatchNorm); GSA-ResNet: --config.addon.kind=gsa_conv --config.addon.sites=
    # 'layer*/*/conv2' (every Bottleneck's 3x3 convolution) --config.addon.from_scratch=True.
    config.addon.sites = ("layer*/*/bn3",) if arch == "resnet50" else ("layer*/*/bn2",)

    a = config.attention
    a.d = 16
    a.batch_norm_kq = True
    a.layer_norm_gatta = True

    t = config.attention_training
    t.learning_rate = 3e-4
    t.weight_decay = 0.0  # the paper's L2 is for the toy models
    t.batch_size = 8
    t.num_epochs = 10
    t.patience = 1
    t.augment = True  # the train preprocessing (random-resized crop, flip)

    config.checkpoint_every_steps = 5000  # an ImageNet epoch at batch 8 is 158,000 steps
    config.eval_batch_size = 256
    config.log_every_steps = 500
    if arg:
        apply_arg(config, arg)
    return config


def apply_arg(config: ml_collections.ConfigDict, arg: str) -> None:
    """'tiny': a small ResNet of the same family on 64-px crops, a few examples (CPU tests on
    tfds mock data); anything else goes to the toy config's arguments ('smoke')."""
    for word in arg.split(","):
        if word != "tiny":
            toy_cifar10.apply_arg(config, word)
            continue
        config.smoke = True
        config.model.width = 8
        config.model.stage_sizes = (1, 1, 1, 1)
        config.dataset.image_shape = (64, 64, 3)
        config.dataset.resize = 73
        config.dataset.workers = 2
        config.dataset.validation_fraction = 0.25
        config.dataset.max_train_examples = 64
        config.dataset.max_test_examples = 24
        config.attention.d = 4
        config.attention_training.num_epochs = 1
        config.eval_batch_size = 16
        config.log_every_steps = 2
