r"""The paper's toy model on CIFAR-10 (Table 1, first row): both training stages.

Pretrain the backbone, then train GAttANet (d = 16) on it, frozen:

  python -m train.main --config configs/toy_cifar10.py --workdir workdirs/toy10_backbone \
      --config.stage=backbone
  python -m train.main --config configs/toy_cifar10.py --workdir workdirs/toy10_attention \
      --config.backbone_checkpoint=workdirs/toy10_backbone

The data is tfds 'local_cifar10', prepared without TensorFlow from a local copy:

  python -m train.prepare_data --source path/to/cifar10-jpeg.tar.xz --name local_cifar10

Shrunk for a CPU check: ``--config configs/toy_cifar10.py:smoke``. Print parameter counts and
sites: ``python -m train.summary --config configs/toy_cifar10.py [--config.attention.d=32]``.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # 'backbone' pretrains the backbone from scratch; 'attention' trains only GAttANet's attention
    # system on the frozen backbone found at `backbone_checkpoint`.
    config.stage = "attention"
    # Seed of parameter initialisation, data order, augmentation and dropout.
    config.seed = 0
    # Backbone workdir (or a checkpoint directory inside one) for the attention stage.
    config.backbone_checkpoint = ""
    # Set by the ':smoke' argument: a few steps of tiny data-sized work for a CPU check.
    config.smoke = False

    config.dataset = ml_collections.ConfigDict()
    # tfds name: 'local_cifar10' / 'local_cifar100' (prepared by train.prepare_data), a tfds
    # dataset prepared elsewhere ('cifar10', 'cifar100'), or 'embedded' (generated, no download).
    config.dataset.name = "local_cifar10"
    # tfds data directory; empty means tfds' default (~/tensorflow_datasets or $TFDS_DATA_DIR).
    config.dataset.data_dir = ""
    # Number of classes (sets the logits layer).
    config.dataset.num_classes = 10
    # Image shape (height, width, channels) the model sees.
    config.dataset.image_shape = (32, 32, 3)
    # Fraction of the train split held out as validation for early stopping and best checkpoints.
    config.dataset.validation_fraction = 0.1
    # What early stopping and the best checkpoint select on: 'held_out' (the fraction above of
    # the train split) or 'test' (train on the whole train split and select on the test split,
    # as Keras scripts with validation_data=(x_test, y_test) do; every result is then labelled
    # as selected on the test set, and its test accuracy is not a held-out figure).
    config.dataset.validation = "held_out"
    # JPEG quality at which every image of the train and test splits is re-encoded once when
    # loaded (PIL, its default 4:2:0 chroma subsampling), 1 to 95; 0 keeps the images as read.
    # A probe of what the data's compression costs: the CIFAR-10 JPEG copy is PIL's quality 75
    # (re-encoding it at 75 changes it little), so lower qualities add compression to it.
    config.dataset.jpeg_quality = 0
    # Examples of each split to use (0 = all); for quick checks.
    config.dataset.max_train_examples = 0
    config.dataset.max_test_examples = 0
    # 'memory': the splits live in accelerator memory as uint8 arrays, batches are picked and
    # augmented inside the compiled step (CIFAR-sized data). 'imagenet': streamed from the tfds
    # source and preprocessed on the host (train/data/imagenet.py; configs/resnet50_imagenet.py).
    config.dataset.pipeline = "memory"

    config.model = ml_collections.ConfigDict()
    # Backbone architecture: 'toy' (the paper's 5-layer CNN).
    config.model.backbone = "toy"
    # The Flax API the backbone is written in: 'linen', or 'nnx' (its NNX twin: the same
    # architecture, parameter names and checkpoints; attention sites reached by graph surgery).
    config.model.api = "linen"
    # Channels of the toy model's conv layers and units of its hidden dense layer.
    config.model.features = (32, 64, 128)
    config.model.hidden = 256
    # Dropout rate of the toy model (backbone training only; frozen = off).
    config.model.dropout_rate = 0.2
    # Where it sits: 'pooling' (after each pooling), 'flatten' (once, before dense1), 'dense1'
    # (once, after dense1's ReLU) or 'pooling_and_dense1' (Keras' CIFAR-10 examples' layout).
    config.model.dropout_after = "pooling"
    # Kernel initialiser of the toy model's layers: 'flax' (LeCun normal, Flax's default) or
    # 'keras' (Glorot uniform, Keras' default); biases start at zero either way.
    config.model.kernel_init = "flax"
    # The toy model sees images in [0, 1] times this: 1, or 255 (raw pixel values, as Keras'
    # ImageDataGenerator feeds them without `rescale`).
    config.model.pixel_scale = 1.0
    # Attention sites: module paths of the backbone, in lesion-notation order ('cccdd').
    config.model.sites = ("conv1", "conv2", "conv3", "dense1", "logits")
    # Computation dtype: 'float32' or 'bfloat16' (parameters stay float32).
    config.model.dtype = "float32"
    # float32 dots and convolutions: 'float32' (Precision.HIGHEST: float32 on every device) or
    # 'tensorfloat32' (Precision.HIGH: TF32 on recent NVIDIA GPUs, faster, about 1e-3 relative
    # error). bfloat16 runs keep XLA's default. train/precision.py.
    config.model.precision = "float32"

    config.attention = ml_collections.ConfigDict()
    # Attention dimension d of keys and queries (Table 1: 16 for CIFAR-10).
    config.attention.d = 16
    # Dropout on keys and queries during attention training (the paper: 0.25).
    config.attention.dropout_rate = 0.25
    # Initial alpha of every site; 0 makes the untrained model exactly the backbone.
    config.attention.alpha_init = 0.0
    # Sites trained (and evaluated) without modulation, in the lesion notation ('c.cdd');
    # '' modulates every site.
    config.attention.lesion = ""
    # The paper's ResNet variant: BatchNorm on keys and queries, LayerNorm (one scale and offset
    # per position) on each agreement map. Off for the toy model, as in the paper.
    config.attention.batch_norm_kq = False
    config.attention.layer_norm_gatta = False
    # Beyond the paper (docs/RESULTS.md). Modulated passes T: pass t + 1 is modulated by the
    # agreement of pass t's modulated activations (1: the paper's two-pass model).
    config.attention.iterations = 1
    # tanh on every agreement map, so factors stay in 1 +- |alpha| (a stabiliser for T > 1).
    config.attention.bounded = False
    # Top-down cues: a learned class embedding (num_classes x d) mixed into q_avg,
    # q_avg := (1 - w) q_avg + w e[class]; during training a fraction of the examples is cued
    # with its true class at weight cue_weight (test accuracy stays uncued; cued accuracies:
    # python -m train.analyze cues).
    config.attention.cue_classes = False
    config.attention.cue_weight = 0.5
    config.attention.cue_fraction = 0.0
    # Multi-head agreement: h heads, each with its own K, Q, q_avg and alpha, each modulating
    # 1/h of the channels (units) of every site; 1 is the paper's model.
    config.attention.heads = 1
    # Where each image's global query comes from: 'own' (Eq. 3, the paper), or a control that
    # removes the image's agreement: 'learned' (one trained vector for every image) or
    # 'shifted' (the previous image's in the batch, in training and test).
    config.attention.q_avg_source = "own"

    # Backbone pretraining recipe (section 2.0.3): Adam with defaults, batch 128, augmentation,
    # early stopping with patience 50 epochs, at most 500 epochs.
    config.backbone_training = ml_collections.ConfigDict()
    config.backbone_training.learning_rate = 1e-3
    config.backbone_training.weight_decay = 0.0  # L2 coefficient added to the loss
    config.backbone_training.batch_size = 128
    config.backbone_training.num_epochs = 500
    config.backbone_training.patience = 50  # epochs without a better validation accuracy
    config.backbone_training.augment = True  # rotation 0-20 deg, shifts 0-20 %, horizontal flip
    # What early stopping watches: 'val_accuracy' (higher is better) or 'val_loss' (lower is
    # better; Keras' EarlyStopping default).
    config.backbone_training.monitor = "val_accuracy"
    # Which weights are the stage's result (best/, evaluated on test): 'best' (the best epoch by
    # the monitored value) or 'last' (the last epoch trained; Keras' EarlyStopping without
    # restore_best_weights).
    config.backbone_training.restore = "best"
    # Evaluates the test split after every epoch into the workdir's history.jsonl, for analyses
    # of the selection rule (train.analyze selection); never used to select.
    config.backbone_training.test_each_epoch = False

    # Attention training recipe: Adam lr 1e-3, L2 1e-5, batch 128, patience 500, at most 1000
    # epochs. The backbone is frozen: the optimizer sees only the attention variables.
    config.attention_training = ml_collections.ConfigDict()
    config.attention_training.learning_rate = 1e-3
    config.attention_training.weight_decay = 1e-5
    config.attention_training.batch_size = 128
    config.attention_training.num_epochs = 1000
    config.attention_training.patience = 500
    config.attention_training.monitor = "val_accuracy"  # as backbone_training's
    config.attention_training.restore = "best"
    config.attention_training.test_each_epoch = False
    # Joint fine-tuning (beyond the paper): the backbone trains too, with its own Adam learning
    # rate; its BatchNorm statistics 'frozen' (stored, unchanged) or 'update' (batch statistics
    # and trained running averages; the backbone then runs in training mode, dropout included).
    config.attention_training.finetune_backbone = False
    config.attention_training.backbone_learning_rate = 1e-5
    config.attention_training.backbone_batch_stats = "frozen"
    # The paper does not say. Measured on the CIFAR-10 JPEG copy (docs/RESULTS.md; same frozen
    # backbone at 71.04 %, 5 attention epochs, seed 0): 71.17 % with the backbone's augmentation
    # in this stage, 73.78 % without. The embedded demo data agree (configs/demo.py). Off.
    config.attention_training.augment = False

    # Comparison systems (stage='addon', gattanet_jax/systems): 'gala', 'se' or 'gsa' (a
    # residual GSA module) after each site, or 'gsa_conv' (GSA modules in place of the sites'
    # convolutions: the GSA toy CNN, or GSA-ResNet with sites 'layer*/*/conv2'). Sites are module
    # paths or glob patterns ('layer*/*/bn2': before each ResNet block's residual addition).
    # from_scratch=False: an add-on to the frozen backbone at backbone_checkpoint, only its
    # parameters trained (attention_training recipe); True: backbone and modules trained together
    # from scratch (backbone_training recipe). configs/compare_toy_cifar10.py sets both up.
    config.addon = ml_collections.ConfigDict()
    config.addon.kind = "gala"
    config.addon.sites = ("conv1", "conv2", "conv3")
    config.addon.from_scratch = False
    # GALA, SE: hidden width C // reduction; residual GSA: GSA at C // reduction channels.
    config.addon.reduction = 4
    config.addon.squash = "tanh"  # GALA: 'tanh' (the paper's formula) or 'sigmoid' (its code)
    # GALA, SE: 'direct' (Y = s * X, the papers) or 'residual' (Y = (1 + gamma * s) * X, gamma
    # from 0: the untrained add-on leaves a frozen backbone as it is, like GAttANet's alpha = 0).
    config.addon.gate = "residual"
    config.addon.heads = 8  # GSA heads (one where they do not divide the channels)

    # Sweeps (train/sweep.py): N members trained at once in one compiled step, one value per
    # member in each non-empty list (empty lists keep the value above). Any stage: backbones of
    # several seeds, or attention systems / add-ons on one frozen backbone or on one each.
    config.sweep = ml_collections.ConfigDict()
    config.sweep.seeds = ()
    config.sweep.learning_rates = ()  # the stage's own recipe's learning rate
    config.sweep.alpha_inits = ()  # attention stage
    config.sweep.lesions = ()  # attention stage
    config.sweep.backbones = ()  # attention, add-on: member i's frozen backbone (a workdir)
    # How the members share the program: 'vmap' (batched), 'loop' (one after the other inside
    # the compiled step, each with the plain run's kernels) or 'auto' ('loop' on a CPU where
    # the members' convolution weights differ, else 'vmap'; train/sweep.py).
    config.sweep.layout = "auto"

    # Devices: 'none' (one device) or 'jit' (data parallel over all local devices; batch sizes
    # are global and must divide by the number of devices).
    config.parallel = "none"

    # Several hosts (train/parallel.py): coordinator 'host:port' with the number of processes
    # and this process's id, or auto=True to let JAX detect the cluster. Needs parallel='jit'.
    config.distributed = ml_collections.ConfigDict()
    config.distributed.coordinator_address = ""
    config.distributed.num_processes = 1
    config.distributed.process_id = 0
    config.distributed.auto = False

    # Checkpoints and logging.
    config.checkpoint_every_epochs = 1  # periodic saves (the best-by-validation one is kept too)
    config.keep_checkpoints = 3  # periodic checkpoints kept besides the best one
    # Also save every N steps within an epoch (0: only at epoch ends); a rerun resumes there and
    # ends exactly as an uninterrupted run. For long epochs (ImageNet).
    config.checkpoint_every_steps = 0
    config.eval_batch_size = 1000
    config.log_every_steps = 50
    # A non-finite loss or gradient: 'stop' (name the step and the last good checkpoint) or
    # 'skip' (drop that update, count it in results.json's skipped_updates, go on).
    config.on_nonfinite = "stop"

    if arg:
        apply_arg(config, arg)
    return config


ARGS = ("smoke",)  # the words of ``:<arg>`` this config takes
VARIANTS = ARGS  # (for --help)


def apply_arg(config: ml_collections.ConfigDict, arg: str) -> None:
    """Config-file arguments: 'smoke' shrinks everything for a CPU check."""
    for word in arg.split(","):
        if word == "smoke":
            config.smoke = True
            config.dataset.max_train_examples = 512
            config.dataset.max_test_examples = 256
            for t in (config.backbone_training, config.attention_training):
                t.batch_size = 32
                t.num_epochs = 1
                t.patience = 1
            config.eval_batch_size = 128
            config.log_every_steps = 5
        else:
            raise ValueError(f"unknown config argument {word!r}; known: 'smoke'")
