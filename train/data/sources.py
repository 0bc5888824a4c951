"""Reading CIFAR from local files without TensorFlow: Toronto python archives, and
split/class/image folder trees or tar archives of them.

Archive members are read in memory and never written to disk; still, every member's path is
checked as if it were extracted into a target directory, and one that would land outside it
(absolute paths, '..', links) is refused: such an archive is malformed or hostile.
"""

from __future__ import annotations

import io
import lzma
import os
import pickle
import posixpath
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from train.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm")
SPLIT_NAMES = {"train": "train", "test": "test"}


def check_member(member: tarfile.TarInfo, archive: str | os.PathLike) -> None:
    """Refuses a member whose path would land outside the directory it is extracted into."""
    name = member.name
    normalized = posixpath.normpath(name)
    if (
        name.startswith(("/", "\\"))
        or os.path.isabs(name)
        or normalized == ".."
        or normalized.startswith("../")
        or ":" in name.split("/")[0]
    ):
        raise UserError(
            f"archive {archive}: entry {name!r} would be written outside the target "
            "directory; refusing to read this archive"
        )
    if member.issym() or member.islnk():
        raise UserError(
            f"archive {archive}: entry {name!r} is a link; refusing to read this archive"
        )


def safe_extract(archive: str | os.PathLike, target: str | os.PathLike) -> None:
    """Extracts an archive into ``target`` after checking every member (see ``check_member``)."""
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        for m in members:
            check_member(m, archive)
        tar.extractall(target, members=members, filter="data")


def jpeg_roundtrip(images: np.ndarray, quality: int) -> np.ndarray:
    """uint8 (N, H, W, 3) images encoded as JPEG at ``quality`` (PIL, 4:2:0 chroma subsampling)
    and decoded again."""
    out = np.empty_like(images)
    for i, image in enumerate(images):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
        with Image.open(buffer) as img:
            out[i] = np.asarray(img.convert("RGB"))
    return out


def decode_image(data: bytes, where: str, shape: tuple[int, int, int]) -> np.ndarray:
    """Decodes one image file, insisting on RGB of the expected size (names the file if not)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            mode, size = img.mode, img.size
            array = np.asarray(img)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise UserError(f"cannot decode image {where}: {e}") from None
    if mode != "RGB":
        raise UserError(f"image {where} is {mode}, not RGB; convert it or remove it")
    if array.shape != shape:
        raise UserError(f"image {where} is {size[0]}x{size[1]}, expected {shape[1]}x{shape[0]}")
    return array


def _folder_files(root: Path) -> Iterator[tuple[str, str, str, bytes]]:
    for split_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            for f in sorted(class_dir.iterdir()):
                if f.suffix.lower() in IMAGE_SUFFIXES:
                    yield split_dir.name, class_dir.name, str(f), f.read_bytes()


def _tar_files(path: Path) -> Iterator[tuple[str, str, str, bytes]]:
    with tarfile.open(path) as tar:
        for member in tar:
            check_member(member, path)
            if not member.isfile():
                continue
            parts = [p for p in member.name.split("/") if p not in ("", ".")]
            if len(parts) < 3 or Path(parts[-1]).suffix.lower() not in IMAGE_SUFFIXES:
                continue
            data = tar.extractfile(member).read()
            yield parts[-3], parts[-2], f"{path}:{member.name}", data


def read_image_tree(path: str | os.PathLike, shape=(32, 32, 3)) -> tuple[dict, list[str]]:
    """Reads ``<split>/<class>/<image>`` from a folder or a tar archive of one.

    Class names are sorted, so labels follow alphabetical order (CIFAR-10's and CIFAR-100's own
    label order). Returns ({split: (images uint8 (N, H, W, C), labels int64 (N,))}, class names).
    """
    path = Path(path)
    files = _folder_files(path) if path.is_dir() else _tar_files(path)
    per_split: dict[str, list[tuple[str, np.ndarray]]] = {}
    for split, cls, where, data in files:
        per_split.setdefault(split, []).append((cls, decode_image(data, where, shape)))
    unknown = set(per_split) - set(SPLIT_NAMES)
    if not per_split or unknown:
        raise UserError(
            f"{path}: expected folders 'train' and 'test' holding one folder per class, found "
            f"{sorted(per_split) or 'no images'}"
        )
    classes = sorted({cls for items in per_split.values() for cls, _ in items})
    index = {c: i for i, c in enumerate(classes)}
    out = {}
    for split, items in per_split.items():
        images = np.stack([img for _, img in items])
        labels = np.asarray([index[c] for c, _ in items], np.int64)
        out[split] = (images, labels)
    return out, classes


def read_toronto(path: str | os.PathLike) -> tuple[dict, list[str]]:
    """Reads ``cifar-10-python.tar.gz`` or ``cifar-100-python.tar.gz`` (fine labels)."""
    path = Path(path)
    batches: dict[str, list] = {"train": [], "test": []}
    meta = None
    with tarfile.open(path) as tar:
        for member in tar:
            check_member(member, path)
            base = posixpath.basename(member.name)
            if not member.isfile():
                continue
            if base.startswith("data_batch") or base == "train":
                batches["train"].append(_unpickle(tar, member))
            elif base in ("test_batch", "test"):
                batches["test"].append(_unpickle(tar, member))
            elif base in ("batches.meta", "meta"):
                meta = _unpickle(tar, member)
    if not batches["train"] or not batches["test"] or meta is None:
        raise UserError(f"{path} is not a CIFAR python archive (no data batches or meta)")
    # CIFAR-10's data_batch_1..5 are read in name order, as in the original loader.
    key = "labels" if b"labels" in batches["test"][0] else "fine_labels"
    names_key = b"label_names" if b"label_names" in meta else b"fine_label_names"
    classes = [n.decode() for n in meta[names_key]]
    out = {}
    for split, parts in batches.items():
        parts = sorted(parts, key=lambda p: p.get(b"batch_label", b""))
        data = np.concatenate([p[b"data"] for p in parts])
        labels = np.concatenate([np.asarray(p[key.encode()]) for p in parts]).astype(np.int64)
        images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).astype(np.uint8)
        out[split] = (images, labels)
    return out, classes


def _unpickle(tar: tarfile.TarFile, member: tarfile.TarInfo) -> dict:
    # The Toronto archives are pickles of plain dicts, lists and numpy arrays; the file is one
    # the user chose to prepare, as with the original CIFAR loader.
    return pickle.load(tar.extractfile(member), encoding="bytes")


def read_source(path: str | os.PathLike) -> tuple[dict, list[str]]:
    """Any supported local source: a Toronto archive, a folder tree or a tar of one. A file that
    is not a readable archive (another format, cut short, damaged) is one line."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"data source {path} does not exist")
    try:
        if path.is_file() and "python" in path.name and path.name.endswith((".tar.gz", ".tgz")):
            return read_toronto(path)
        return read_image_tree(path)
    except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, pickle.UnpicklingError) as e:
        what = " ".join(str(e).split()) or type(e).__name__
        raise UserError(
            f"data source {path} is not a readable tar archive (plain, .gz, .bz2 or .xz) or "
            f"folder of images: {what[:160]}"
        ) from None
