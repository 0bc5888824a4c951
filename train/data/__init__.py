"""Data: the input pipeline (``input_pipeline``), ImageNet streamed from tfds (``imagenet``),
local sources and the tfds builders that prepare them (``sources``, ``tfds_builders``), and
augmentation (``augment``). ``python -m train.prepare_data`` prepares a dataset."""
