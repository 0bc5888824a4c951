"""Orbax checkpoints of a workdir.

A workdir holds two managers:
  checkpoints/  the full training state (parameters, optimizer, counters) every few epochs,
                keep-N; rerunning a command resumes from its latest step.
  best/         the model variables with the best validation accuracy so far (one kept): what
                the final evaluation uses and what the attention stage loads as its backbone.
Orbax writes each step to a temporary directory and renames it when complete, so a crash during
a save leaves the previous step as the latest. Each saved step then gets ``DIGEST_FILE``, the
sha256 of its files (written to a temporary name and renamed), and only then are steps beyond
the manager's keep-N pruned: at every instant the newest step with a digest is complete, and the
one before it is still there while the newest has none. Every restore checks the digest: a
damaged or truncated file is a ``DamagedCheckpoint``, one line, never a TensorStore traceback.
A directory where this version has saved (its ``MARKER`` file, or a step with a digest) holds
no step without one but an incomplete or damaged one; steps saved before digests existed (the
shipped models) restore unchecked.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging

from train import signals
from train.errors import UserError


def manager(directory: str | os.PathLike, keep: int, create: bool = True):
    """An orbax manager of ``directory`` that keeps the newest ``keep`` steps (pruned by
    ``save`` once the new step has its digest, not by orbax before)."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None,
        create=create,
        enable_async_checkpointing=False,
        cleanup_tmp_directories=create,
    )
    mngr = ocp.CheckpointManager(
        Path(directory).absolute(), options=options, item_handlers=ocp.StandardCheckpointHandler()
    )
    mngr.gattanet_keep = keep
    return mngr


def describe(tree) -> dict[str, tuple]:
    """'path/to/leaf' -> shape, for every array leaf of a tree (arrays, shapes or metadata)."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        name = "/".join(_key_name(k) for k in path)
        out[name] = tuple(getattr(leaf, "shape", np.shape(leaf)))
    return out


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey (namedtuples), SequenceKey
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def dtypes(tree) -> dict[str, str]:
    """'path/to/leaf' -> dtype name, for every leaf of a tree that has one."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        dtype = getattr(leaf, "dtype", None)
        if dtype is not None:
            out["/".join(_key_name(k) for k in path)] = np.dtype(dtype).name
    return out


def mismatches(expected, found) -> list[str]:
    """Human-readable differences between two trees' names, shapes and dtypes."""
    want, have = describe(expected), describe(found)
    lines = [f"missing {n} {want[n]}" for n in want if n not in have]
    lines += [f"unexpected {n} {have[n]}" for n in have if n not in want]
    lines += [
        f"{n}: checkpoint {have[n]}, model {want[n]}"
        for n in want
        if n in have and want[n] != have[n]
    ]
    want_types, have_types = dtypes(expected), dtypes(found)
    lines += [
        f"{n}: checkpoint {have_types[n]}, model {want_types[n]}"
        for n in want_types
        if n in have_types and have_types[n] != want_types[n]
    ]
    return lines


def nonfinite(tree) -> list[str]:
    """The leaves of a tree of arrays that hold NaN or infinity ('path (n of size)')."""
    out = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        array = np.asarray(leaf)
        if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
            bad = int(array.size - np.count_nonzero(np.isfinite(array)))
            out.append(f"{'/'.join(_key_name(k) for k in path)} ({bad} of {array.size})")
    return out


DIGEST_FILE = "digest.sha256"
MARKER = ".digests"  # in a manager's directory: every step saved here gets a digest


class DamagedCheckpoint(UserError):
    """A checkpoint step whose files do not match the digest written with it."""


def write_digest(directory: str | os.PathLike, step: int) -> None:
    """Records the sha256 of a saved step inside it, atomically (a temporary name, renamed)."""
    root = Path(directory) / str(step)
    tmp = root / f".{DIGEST_FILE}.tmp"
    tmp.write_text(digest(directory, step) + "\n")
    os.replace(tmp, root / DIGEST_FILE)


def writes_digests(directory: str | os.PathLike) -> bool:
    """Whether steps in ``directory`` were saved by a version that writes digests (its marker,
    or any step with a digest)."""
    root = Path(directory)
    if (root / MARKER).exists():
        return True
    try:
        return any((c / DIGEST_FILE).is_file() for c in root.iterdir() if c.name.isdigit())
    except OSError:
        return False


def verify(directory: str | os.PathLike, step: int, what: str) -> None:
    """Raises DamagedCheckpoint if the step's files do not match its recorded digest, or if it
    has none where this version saved (a step saved before digests existed passes
    unchecked)."""
    recorded = Path(directory) / str(step) / DIGEST_FILE
    try:
        expected = recorded.read_text().strip()
    except FileNotFoundError:
        if writes_digests(directory):
            raise DamagedCheckpoint(
                f"the {what} at {directory}/{step} has no {DIGEST_FILE}, which is written with "
                "every checkpoint here: it is incomplete or was changed (restore it from a copy, "
                "or train it again: the same command in a new workdir rebuilds it exactly)"
            ) from None
        return
    except OSError as e:
        raise DamagedCheckpoint(f"cannot read the {what}'s digest {recorded}: {e}") from None
    try:
        found = digest(directory, step)
    except OSError as e:
        raise DamagedCheckpoint(f"cannot read the {what} at {directory}/{step}: {e}") from None
    if found != expected:
        raise DamagedCheckpoint(
            f"the {what} at {directory}/{step} is damaged: its files do not match the digest "
            "written with it (restore it from a copy, or train it again: the same command in a "
            "new workdir rebuilds it exactly)"
        )


def set_aside(mngr, step: int) -> Path:
    """Renames a damaged step out of the manager's sight (``<step>.damaged``), for a look later."""
    src = Path(mngr.directory) / str(step)
    dst = src.with_name(f"{step}.damaged")
    n = 1
    while dst.exists():
        n += 1
        dst = src.with_name(f"{step}.damaged{n}")
    if jax.process_index() == 0:  # one renamer where several hosts share the workdir
        src.rename(dst)
    mngr.reload()
    return dst


def restore(mngr, step: int, abstract, what: str):
    """Restores ``step`` into the structure of ``abstract``, after checking its digest; a clear
    error if it is damaged or does not fit."""
    verify(mngr.directory, step, what)
    try:
        found = mngr.item_metadata(step)
    except Exception as e:
        raise UserError(f"cannot read the {what} at {mngr.directory}/{step}: {e}") from None
    found = getattr(found, "tree", found)
    diff = mismatches(abstract, found) if found is not None else []
    if diff:
        raise UserError(
            f"the {what} at {mngr.directory}/{step} does not fit this config: "
            + "; ".join(diff[:12])
            + (f"; and {len(diff) - 12} more" if len(diff) > 12 else "")
        )
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract)
    try:
        with _closed_loop_dropped(on_failure=_drop_abandoned_reads):
            return mngr.restore(step, args=ocp.args.StandardRestore(target))
    except Exception as e:  # TensorStore/orbax on missing or truncated files
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise DamagedCheckpoint(
            f"cannot read the {what} at {mngr.directory}/{step}: {first}"
        ) from None


def save(mngr, step: int, tree, what: str = "save") -> None:
    """Saves ``step`` and its digest, then prunes the steps beyond the manager's keep-N; a
    failed write (a full disk, a lost mount: an OSError, or TensorStore's RESOURCE_EXHAUSTED)
    is one clear line naming the complete checkpoint that is still there. ``what`` names the
    phase (``train.signals``): 'save_best', 'save_periodic', ..."""
    try:
        signals.phase(what)
        if step in mngr.all_steps():  # left by a trajectory the run replays: written again
            mngr.delete(step)
        with _quiet_failed_writes():
            mngr.save(step, args=ocp.args.StandardSave(tree), force=True)
            mngr.wait_until_finished()
        signals.phase(f"{what}:written")  # renamed into place, no digest yet
        if jax.process_index() == 0:  # the process that finalized the step (several hosts)
            marker = Path(mngr.directory) / MARKER
            if not marker.exists():
                marker.write_text("every step saved here has its digest.sha256\n")
            write_digest(mngr.directory, step)
            signals.phase(f"{what}:digest")  # complete; older steps not pruned yet
            _prune(mngr, step)
    except (OSError, ValueError) as e:
        if isinstance(e, ValueError) and not _out_of_space(e):
            raise
        try:
            mngr.reload()
            kept = mngr.latest_step()
        except Exception:  # the directory itself may be unreadable now
            kept = None
        where = f"{mngr.directory}/{kept}" if kept is not None else "none"
        raise UserError(
            f"could not write checkpoint {step} to {mngr.directory}: {write_error(e)}; the last "
            f"complete checkpoint is {where}; free space and rerun the same command to resume"
        ) from None


def _prune(mngr, saved: int) -> None:
    """Deletes the oldest steps beyond the manager's keep-N (never the one just saved)."""
    keep = getattr(mngr, "gattanet_keep", None)
    if not keep:
        return
    mngr.reload()
    steps = sorted(s for s in mngr.all_steps() if s != saved)
    for old in steps[: max(0, len(steps) + 1 - keep)]:
        mngr.delete(old)


@contextlib.contextmanager
def _quiet_failed_writes():
    """While orbax writes: a failed write (a full disk) is reported once, as this module's one
    line, not also as the tracebacks orbax's writer threads log and TensorStore's callbacks
    print into a closed event loop."""
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.FATAL)
    try:
        # orbax's writers may log the same failure a moment later, after this context has
        # ended: their filters go in before the verbosity is back
        with _closed_loop_dropped(on_failure=_drop_writer_errors):
            yield
    finally:
        absl_logging.set_verbosity(verbosity)


@contextlib.contextmanager
def _closed_loop_dropped(on_failure):
    """While orbax reads or writes: TensorStore's callbacks into an event loop orbax has closed
    (printed through ``sys.excepthook`` or ``sys.unraisablehook``, at any moment once a read or
    write has failed, even before the failure reaches this thread) are dropped. If the body
    fails they stay dropped, as they go on arriving after it, and ``on_failure()`` runs;
    otherwise the hooks are put back."""
    excepthook, unraisable = sys.excepthook, sys.unraisablehook

    def without_closed_loop(hook):
        def quiet(*args):
            value = args[1] if len(args) > 1 else getattr(args[0], "exc_value", None)
            if not _closed_loop(value):
                hook(*args)

        return quiet

    sys.excepthook, sys.unraisablehook = (
        without_closed_loop(excepthook),
        without_closed_loop(unraisable),
    )
    try:
        yield
    except BaseException:
        on_failure()
        raise
    sys.excepthook, sys.unraisablehook = excepthook, unraisable


def _closed_loop(error) -> bool:
    """TensorStore's callbacks into an event loop orbax has closed already."""
    return isinstance(error, RuntimeError) and "Event loop is closed" in str(error)


def _drop_abandoned_reads() -> None:
    """After a failed restore: orbax's reads of the checkpoint's other arrays fail or stop too,
    in coroutines nobody awaits any more, and each reports its exception as unraisable when it
    is collected (a TensorStore traceback per array, after the one-line error). From now on
    those reports are dropped; every other unraisable exception still reaches the hook."""
    if getattr(sys.unraisablehook, "_drops_abandoned_reads", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        code = getattr(unraisable.object, "cr_code", None)
        from_orbax = code is not None and "orbax" in code.co_filename
        if not (from_orbax or _closed_loop(unraisable.exc_value)):
            previous(unraisable)

    hook._drops_abandoned_reads = True
    sys.unraisablehook = hook
    _drop_writer_errors()  # their gathering futures' never-retrieved exceptions, likewise


def _drop_writer_errors() -> None:
    """Filters for what orbax's writers leave behind a failed write: their threads'
    '<thread>.run() raised an exception' (absl) and the never-retrieved exceptions of their
    asyncio tasks, logged when those are collected (asyncio)."""
    for name in ("absl", "asyncio"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _WriterErrors) for f in logger.filters):
            logger.addFilter(_WriterErrors())


class _WriterErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "orbax" in record.pathname and "raised an exception" in message:
            return False
        never_retrieved = "exception was never retrieved" in message
        named = "orbax" in message or "RESOURCE_EXHAUSTED" in message
        return not (never_retrieved and (named or _raised_in_orbax(record)))


def _raised_in_orbax(record: logging.LogRecord) -> bool:
    """Whether the record's exception (or one it was raised from) passed through orbax."""
    error = record.exc_info[1] if record.exc_info else None
    seen = 0
    while error is not None and seen < 8:
        tb = error.__traceback__
        while tb is not None:
            if "orbax" in tb.tb_frame.f_code.co_filename:
                return True
            tb = tb.tb_next
        error, seen = error.__cause__ or error.__context__, seen + 1
    return False


def _out_of_space(e: Exception) -> bool:
    text = str(e)
    return "RESOURCE_EXHAUSTED" in text or "No space left" in text or "ENOSPC" in text


def write_error(e: Exception) -> str:
    """A write failure in a few words: the OS's reason, or 'no space left on the device'."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return "no space left on the device" if _out_of_space(e) else str(e).splitlines()[0][:200]


def find_model_checkpoint(path: str) -> tuple[str, int]:
    """A backbone (or attention) workdir, its best/ or checkpoints/ directory, or a step
    directory -> (manager directory of best variables, step)."""
    p = Path(path).expanduser()
    if not path or not p.exists():
        raise UserError(
            f"backbone checkpoint {path!r} not found; train one with --config.stage=backbone "
            "and pass its workdir as --config.backbone_checkpoint"
        )
    if (p / "best").is_dir():
        p = p / "best"
    if p.name.isdigit() and p.parent.is_dir():
        return str(p.parent), int(p.name)
    steps = sorted(int(c.name) for c in p.iterdir() if c.name.isdigit()) if p.is_dir() else []
    if not steps:
        raise UserError(f"no complete checkpoint in {p} (expected a workdir with best/ inside)")
    if writes_digests(p):  # a step without its digest is one a crash left before it
        complete = [s for s in steps if (p / str(s) / DIGEST_FILE).is_file()]
        if complete and complete[-1] != steps[-1]:
            from train import progress

            progress.log(
                f"note: {p}/{steps[-1]} has no {DIGEST_FILE} (a save cut short): taking "
                f"{p}/{complete[-1]}, the newest complete step"
            )
            return str(p), complete[-1]
    return str(p), steps[-1]


def unfinished_training(path: str) -> int | None:
    """For a training workdir whose run has not ended (checkpoints/ and no results.json): the
    epoch of its last checkpoint (0 if none yet); None for anything else."""
    p = Path(path).expanduser()
    if not (p / "checkpoints").is_dir() or (p / "results.json").exists():
        return None
    return max((int(c.name) for c in (p / "checkpoints").iterdir() if c.name.isdigit()), default=0)


def digest(directory: str | os.PathLike, step: int) -> str:
    """sha256 over the names and bytes of every file of a checkpoint step."""
    root = Path(directory) / str(step)
    h = hashlib.sha256()
    files = (p for p in root.rglob("*") if p.is_file() and DIGEST_FILE not in p.name)
    for f in sorted(files):
        h.update(str(f.relative_to(root)).encode() + b"\0")
        h.update(f.read_bytes())
    return h.hexdigest()


def digest_file(path: str | os.PathLike) -> str:
    """sha256 of one file (pretrained weights)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def source_digest(path: str) -> str:
    """The sha256 a run records for its frozen backbone: of a weights file, or of the best
    checkpoint of a workdir (as ``find_model_checkpoint`` picks it)."""
    if Path(path).is_file():
        return digest_file(path)
    directory, step = find_model_checkpoint(path)
    return digest(directory, step)


def check_recorded_backbone(results: dict, sha: str, where: str) -> None:
    """Refuses a run whose frozen backbone has changed since it trained (the sha256 its
    results.json records against the backbone's now)."""
    recorded = results.get("backbone_checkpoint_sha256")
    if recorded and recorded != sha:
        raise UserError(
            f"the backbone of {where} has changed since it trained: results.json records sha256 "
            f"{recorded[:12]}..., {results.get('backbone_checkpoint')} is {sha[:12]}... now; "
            "restore the original backbone, or train this run again"
        )
