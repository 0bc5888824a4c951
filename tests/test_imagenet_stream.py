"""The ImageNet pipeline (train/data/imagenet.py, grain over a random-access source): order,
crops, resume, per-process slices, evaluation padding and errors, on generated images."""

import numpy as np
import pytest

from train.data import imagenet
from train.errors import UserError


def source(n=40, num_classes=5, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        h, w = (int(v) for v in rng.integers(20, 40, 2))
        image = rng.integers(0, 256, (h, w) if i == 3 else (h, w, 3), dtype=np.uint8)
        rows.append({"image": image, "label": i % num_classes})
    return rows


def stream(rows=None, workers=3):
    rows = source() if rows is None else rows
    return imagenet.Stream(rows, np.arange(len(rows)), 16, 18, 5, "gen/train", workers)


def collect(batches):
    images, labels = zip(*batches, strict=True)
    return np.stack(images), np.stack(labels)


def test_training_batches_are_the_recipes_crops_in_an_order_of_seed_and_epoch():
    s = stream()
    images, labels = collect(s.train_batches(8, seed=7, epoch=2))
    assert images.shape == (5, 8, 16, 16, 3) and images.dtype == np.uint8
    order = np.random.default_rng([7, 2]).permutation(40)
    rows = source()
    for step, column in [(0, 0), (2, 5), (4, 7)]:
        index = order[step * 8 + column]
        assert labels[step, column] == rows[index]["label"]
        image = rows[index]["image"]
        image = np.repeat(image[..., None], 3, -1) if image.ndim == 2 else image
        rng = np.random.default_rng([7, 2, step, column])
        want = imagenet.random_resized_crop(image, rng, 16)
        want = want[:, ::-1] if rng.random() < 0.5 else want
        np.testing.assert_array_equal(images[step, column], want)
    again, _ = collect(s.train_batches(8, seed=7, epoch=2))
    other, _ = collect(s.train_batches(8, seed=7, epoch=3))
    np.testing.assert_array_equal(again, images)
    assert not np.array_equal(other, images)
    # augment=False: the evaluation crop of the same examples in the same order
    plain, _ = collect(s.train_batches(8, seed=7, epoch=2, augment=False))
    np.testing.assert_array_equal(plain[1, 2], s.head(40)[order[8 + 2]])


def test_resuming_at_a_step_and_process_slices_give_the_whole_epochs_batches():
    s = stream()
    whole, whole_labels = collect(s.train_batches(8, seed=1, epoch=0))
    tail, _ = collect(s.train_batches(8, seed=1, epoch=0, start=3))
    np.testing.assert_array_equal(tail, whole[3:])
    parts = [collect(s.train_batches(8, 1, 0, shard=(k, 4))) for k in range(4)]
    np.testing.assert_array_equal(np.concatenate([p[0] for p in parts], axis=1), whole)
    np.testing.assert_array_equal(np.concatenate([p[1] for p in parts], axis=1), whole_labels)


def test_evaluation_reads_every_example_once_in_order_and_pads_the_last_batch():
    s = stream(workers=1)
    images, labels = zip(*s.eval_batches(16), strict=True)
    assert [len(x) for x in labels] == [16, 16, 16]
    labels = np.concatenate(labels)
    np.testing.assert_array_equal(labels[:40], np.arange(40) % 5)
    np.testing.assert_array_equal(labels[40:], -1)
    images = np.concatenate(images)
    np.testing.assert_array_equal(images[:40], s.head(40))
    np.testing.assert_array_equal(images[40:], np.repeat(images[39:40], 8, axis=0))


def test_a_bad_label_or_image_is_one_clear_error_from_the_reading_threads():
    rows = source()
    rows[30]["label"] = 9
    with pytest.raises(UserError, match=r"gen/train example 30: label 9 is outside \[0, 5\)"):
        collect(stream(rows).eval_batches(8))
    rows = source()
    rows[5]["image"] = np.zeros((20, 20, 4), np.uint8)
    with pytest.raises(UserError, match=r"example 5: image of shape \(20, 20, 4\), not RGB"):
        collect(stream(rows).train_batches(8, seed=0, epoch=0))
