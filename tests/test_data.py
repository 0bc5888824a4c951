"""Data: local CIFAR sources, safe archives, bad images, tfds preparation and reading."""

import hashlib
import io
import pickle
import tarfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from train import prepare_data
from train.data import input_pipeline, sources
from train.errors import UserError

CLASSES = [f"class{i}" for i in range(10)]


def write_tree(root, per_class=2, size=32, classes=CLASSES):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                array = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(array).save(root / split / c / f"{i:04d}.png")
    return root


def tar_of(folder, out, extra=()):
    with tarfile.open(out, "w:gz") as tar:
        tar.add(folder, arcname=".")
        for info, data in extra:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return out


def test_embedded_dataset_is_deterministic_and_covers_every_class():
    a, b = input_pipeline.embedded_split(300, 1), input_pipeline.embedded_split(300, 1)
    np.testing.assert_array_equal(a.images, b.images)
    assert a.images.shape == (300, 32, 32, 3) and a.images.dtype == np.uint8
    assert set(a.labels.tolist()) == set(range(10))


def test_the_first_images_of_the_embedded_data_are_the_whole_splits_first():
    """A run reads only its first images (config.dataset.max_*_examples); they are the same
    images as the first of the whole split, which is itself the one every result was made on."""
    whole = input_pipeline.embedded_split(700, 1)
    digest = hashlib.sha256(whole.images.tobytes() + whole.labels.tobytes()).hexdigest()
    assert digest == "44508fcc833a10dbef5d3c21a8a1353440174e1db3f6c190415b9e6271489593"
    for k in (1, 300, 513, 700):
        part = input_pipeline.embedded_split(700, 1, first=k)
        np.testing.assert_array_equal(part.images, whole.images[:k])
        np.testing.assert_array_equal(part.labels, whole.labels[:k])


def test_folder_tree_and_its_tar_read_the_same(tmp_path):
    root = write_tree(tmp_path / "tree")
    splits, classes = sources.read_source(root)
    assert classes == sorted(CLASSES)
    images, labels = splits["train"]
    assert images.shape == (20, 32, 32, 3) and labels.tolist() == sorted([i for i in range(10)] * 2)
    first = np.asarray(Image.open(root / "train" / "class0" / "0000.png"))
    np.testing.assert_array_equal(images[0], first)
    tar_splits, tar_classes = sources.read_source(tar_of(root, tmp_path / "tree.tar.gz"))
    assert tar_classes == classes
    np.testing.assert_array_equal(tar_splits["test"][0], splits["test"][0])


def _pickle_member(name, obj):
    data = pickle.dumps(obj)
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def test_toronto_python_archive(tmp_path):
    rng = np.random.default_rng(1)
    members = []
    for i in range(1, 6):
        data = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        members.append(
            _pickle_member(
                f"cifar-10-batches-py/data_batch_{i}",
                {
                    b"batch_label": f"training batch {i} of 5".encode(),
                    b"data": data,
                    b"labels": [i % 10] * 4,
                },
            )
        )
    test = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
    members.append(
        _pickle_member(
            "cifar-10-batches-py/test_batch",
            {b"batch_label": b"testing batch 1 of 1", b"data": test, b"labels": [7, 8, 9]},
        )
    )
    members.append(
        _pickle_member(
            "cifar-10-batches-py/batches.meta", {b"label_names": [n.encode() for n in CLASSES]}
        )
    )
    path = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data))
    splits, classes = sources.read_source(path)
    assert classes == CLASSES
    assert splits["train"][0].shape == (20, 32, 32, 3)
    images, labels = splits["test"]
    assert labels.tolist() == [7, 8, 9]
    # Row-major CHW planes: red plane first.
    assert images[1, 0, 2, 0] == test[1, 2] and images[1, 0, 2, 1] == test[1, 1024 + 2]


@pytest.mark.parametrize("name", ["../evil.png", "/abs/evil.png", "train/../../evil.png"])
def test_archive_entry_escaping_the_target_is_refused(tmp_path, name):
    root = write_tree(tmp_path / "tree", per_class=1)
    info = tarfile.TarInfo(name)
    info.size = 3
    path = tar_of(root, tmp_path / "bad.tar.gz", extra=[(info, b"abc")])
    with pytest.raises(UserError, match="outside the target directory"):
        sources.read_source(path)
    with pytest.raises(UserError, match="outside the target directory"):
        sources.safe_extract(path, tmp_path / "out")
    assert not (tmp_path / "evil.png").exists()


def test_archive_with_a_link_is_refused(tmp_path):
    root = write_tree(tmp_path / "tree", per_class=1)
    link = tarfile.TarInfo("train/class0/link.png")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    path = tar_of(root, tmp_path / "link.tar.gz", extra=[(link, None)])
    with pytest.raises(UserError, match="is a link"):
        sources.read_source(path)


@pytest.mark.parametrize(
    ("kind", "match"),
    [
        ("corrupt", "cannot decode image .*bad.png"),
        ("gray", "bad.png is L, not RGB"),
        ("size", "bad.png is 16x16, expected 32x32"),
    ],
)
def test_bad_images_are_named(tmp_path, kind, match):
    root = write_tree(tmp_path / "tree", per_class=1)
    bad = root / "train" / "class3" / "bad.png"
    if kind == "corrupt":
        bad.write_bytes(b"not an image at all")
    elif kind == "gray":
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(bad)
    else:
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(bad)
    with pytest.raises(UserError, match=match):
        sources.read_source(root)


def test_prepare_without_tensorflow_and_read_back_through_data_source(tmp_path):
    root = write_tree(tmp_path / "tree")
    data_dir = str(tmp_path / "tfds")
    where = prepare_data.prepare(str(root), "local_cifar10", data_dir)
    assert "local_cifar10" in where
    splits, names = input_pipeline.read_tfds("local_cifar10", data_dir)
    assert names == tuple(sorted(CLASSES))
    expected, _ = sources.read_source(root)
    for name in ("train", "test"):  # tfds shuffles on writing: compare the sets of examples
        images, labels = expected[name]
        assert examples(splits[name].images, splits[name].labels) == examples(images, labels)
    # a prepared split damaged since (a copy cut short, a failing disk): one line, not Riegeli's
    (record,) = (tmp_path / "tfds").rglob("*-test.array_record*")
    record.write_bytes(record.read_bytes()[: record.stat().st_size // 2])
    with pytest.raises(UserError, match=r"split 'test' in .* is damaged \(.*\); prepare it again"):
        input_pipeline.read_tfds("local_cifar10", data_dir)


@pytest.mark.parametrize("content", [b"not an archive", b"\x1f\x8b\x08" + bytes(64)])
def test_a_source_that_is_not_an_archive_is_one_line(tmp_path, content):
    (tmp_path / "cifar.tar.gz").write_bytes(content)  # another format; a gzip cut short
    with pytest.raises(UserError, match=r"is not a readable tar archive .* or folder of images"):
        sources.read_source(tmp_path / "cifar.tar.gz")


def examples(images, labels):
    return sorted(zip(labels.tolist(), (a.tobytes() for a in images), strict=True))


def test_missing_dataset_names_the_directory_and_the_fix(tmp_path):
    with pytest.raises(UserError, match=r"not prepared in .*tfds \(not found\).*prepare_data --s"):
        input_pipeline.read_tfds("local_cifar10", str(tmp_path / "tfds"))
    with pytest.raises(UserError, match="unknown tfds dataset 'no_such_set'"):
        input_pipeline.read_tfds("no_such_set", str(tmp_path))


def test_named_tfds_dataset_through_mock_data(tmp_path):
    with tfds.testing.mock_data(num_examples=24):
        splits, names = input_pipeline.read_tfds("cifar10", str(tmp_path))
    assert splits["train"].images.shape == (24, 32, 32, 3)
    assert splits["train"].images.dtype == np.uint8
    assert len(names) == 10  # real names come with the prepared data, not the mock


def test_validation_is_carved_from_train_without_overlap():
    split = input_pipeline.embedded_split(200, 3)
    train, val = input_pipeline.carve_validation(split, 0.1, seed=0)
    assert len(train) == 180 and len(val) == 20
    seen = {a.tobytes() for a in train.images}
    assert not any(a.tobytes() in seen for a in val.images)


def test_data_prepared_as_tfrecord_is_its_own_error_with_the_fix(tmp_path):
    data_dir = str(tmp_path / "tfds")
    fix = r"tfds build imagenet2012 --data_dir .*tfds --file_format=array_record --manual_dir"
    with pytest.raises(
        UserError, match=r"split 'train' is not prepared in .*; prepare it with: " + fix
    ):
        input_pipeline.open_source("imagenet2012", "train", data_dir)
    version = tmp_path / "tfds" / "imagenet2012" / "5.1.0"
    version.mkdir(parents=True)
    (version / "imagenet2012-train.tfrecord-00000-of-00001").write_bytes(b"")
    tfrecord = r"'imagenet2012' in .*tfds is prepared as TFRecord files, which tfds.data_source"
    with pytest.raises(UserError, match=tfrecord + r".*prepare it again as array_record: " + fix):
        input_pipeline.open_source("imagenet2012", "train", data_dir)
