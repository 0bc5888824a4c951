"""A workdir that changes under a run: one writer at a time, a pinned config, checksummed
checkpoints, parts of a workdir lost."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from train import checkpoints, lock, train
from train.errors import UserError

from .test_train import tiny_config

# These tests damage checkpoints on purpose: orbax's reads abandoned midway leave coroutines
# that report, when collected, into whichever unraisable hook pytest has installed for the test
# running then (a command shows only its one error line: the command-line test below).
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    holder = rf"in use by pid {os.getpid()} on host \S+ \(since "
    with lock.hold(tmp_path / "w"):
        with pytest.raises(UserError, match=holder), lock.hold(tmp_path / "w"):
            pass
        with pytest.raises(UserError, match="in use by pid"):  # before any work
            train.train_and_evaluate(tiny_config(), str(tmp_path / "w"))
    with lock.hold(tmp_path / "w"):  # released: free again
        pass


def test_a_dead_holders_lock_is_taken_over_and_said(tmp_path, capsys):
    code = (
        "import os\nfrom train import lock\n"
        f"with lock.hold({str(tmp_path / 'w')!r}):\n    os.kill(os.getpid(), 9)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert r.returncode == -9
    holder = json.loads((tmp_path / "w" / lock.LOCK).read_text())
    with lock.hold(tmp_path / "w"):
        pass
    out = capsys.readouterr().out
    assert f"took over the lock of {tmp_path / 'w'} from pid {holder['pid']}" in out
    with lock.hold(tmp_path / "w"):  # a clean release leaves nothing to take over
        pass
    assert "took over" not in capsys.readouterr().out


@pytest.mark.parametrize(
    "field, value",
    [
        ("attention.dropout_rate", float("nan")),
        ("backbone_training.learning_rate", float("inf")),
        ("attention.alpha_init", float("nan")),
        ("attention_training.weight_decay", float("-inf")),
        ("attention.cue_weight", float("nan")),
    ],
)
def test_non_finite_numbers_anywhere_are_refused_before_any_work(tmp_path, field, value):
    config = tiny_config(stage="both")
    section, name = field.split(".")
    config[section][name] = value
    with pytest.raises(UserError, match=rf"config\.{field} must be finite"):
        train.train_and_evaluate(config, str(tmp_path / "w"))
    assert not (tmp_path / "w" / "backbone").exists()


def test_second_stage_and_parallel_mistakes_are_refused_before_the_first_stage(tmp_path):
    from train.tools import summary

    config = tiny_config(stage="both")
    config.attention.lesion = "xyz"
    with pytest.raises(UserError, match=r"config\.attention\.lesion: lesion 'xyz' must have"):
        train.train_and_evaluate(config, str(tmp_path / "w"))
    assert not (tmp_path / "w" / "backbone").exists()  # nothing trained
    with pytest.raises(UserError, match=r"config\.attention\.lesion"):
        summary.dry_run(config)
    config = tiny_config()
    config.parallel = "foo"
    with pytest.raises(UserError, match=r"config\.parallel must be one of"):
        summary.dry_run(config)


@pytest.mark.parametrize("backbones", [[], [""], ["pretrained/toy_cifar10_s0/backbone", ""]])
def test_compare_refuses_empty_backbone_names_before_training(tmp_path, backbones):
    from train.tools import compare

    with pytest.raises(UserError, match="--backbones must name"):
        compare.compare(str(tmp_path), backbones, ["gattanet"], "smoke")
    assert not any(tmp_path.iterdir())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished two-epoch backbone run (periodic checkpoints of epochs 1 and 2, best/)."""
    workdir = tmp_path_factory.mktemp("trained") / "w"
    _, results = train.train_and_evaluate(tiny_config(), str(workdir))
    return workdir, results


def _copy(trained, tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(trained[0], workdir)
    (workdir / lock.LOCK).unlink(missing_ok=True)
    return workdir


def _damage(step_dir, truncate=False):
    """XORs 64 bytes in the middle of the step's largest data file (or cuts it in half)."""
    files = [p for p in step_dir.rglob("*") if p.is_file() and "digest" not in p.name]
    target = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    if truncate:
        data = data[: len(data) // 2]
    else:
        mid = len(data) // 2
        data[mid : mid + 64] = bytes(b ^ 0x5A for b in data[mid : mid + 64])
    target.write_bytes(bytes(data))


def _retrain(directory, step):
    """Rewrites ``step`` of the manager at ``directory`` with other (finite) weights, as a
    backbone trained again in the same place would be; digest included."""
    mngr = checkpoints.manager(directory, keep=100, create=False)
    found = mngr.restore(step, args=ocp.args.StandardRestore())
    changed = jax.tree.map(
        lambda x: np.asarray(x) * 0.5 if np.issubdtype(np.asarray(x).dtype, np.floating) else x,
        found,
    )
    checkpoints.save(mngr, step, changed)


def test_every_saved_checkpoint_records_its_digest(trained):
    workdir, _ = trained
    for manager in ("checkpoints", "best"):
        for step_dir in (p for p in (workdir / manager).iterdir() if p.name.isdigit()):
            recorded = (step_dir / checkpoints.DIGEST_FILE).read_text().strip()
            assert recorded == checkpoints.digest(workdir / manager, int(step_dir.name))


@pytest.mark.parametrize("truncate", [False, True])
def test_a_damaged_best_checkpoint_is_one_clear_error(trained, tmp_path, truncate):
    workdir = _copy(trained, tmp_path)
    _damage(workdir / "best" / str(trained[1]["best_epoch"]), truncate)
    with pytest.raises(UserError, match=r"best checkpoint at .*/best/\d is damaged.*new workdir"):
        train.train_and_evaluate(tiny_config(), str(workdir))
    second = tiny_config(stage="attention")
    second.backbone_checkpoint = str(workdir)
    with pytest.raises(UserError, match=r"backbone checkpoint at .* is damaged"):
        train.train_and_evaluate(second, str(tmp_path / "a"))


def test_a_damaged_periodic_checkpoint_is_set_aside_and_the_run_resumes_before_it(
    trained, tmp_path, capsys
):
    workdir = _copy(trained, tmp_path)
    _damage(workdir / "checkpoints" / "2")
    _, results = train.train_and_evaluate(tiny_config(epochs=3), str(workdir))
    out = capsys.readouterr().out
    assert "checkpoints/2 is damaged" in out and "set aside as" in out
    assert "resumed from epoch 1" in out
    assert results["epochs"] == 3 and (workdir / "checkpoints" / "2.damaged").is_dir()


def _as_before_digests(workdir):
    """The workdir as a version before digests wrote it: no digest files, no markers."""
    for path in list(workdir.rglob(checkpoints.DIGEST_FILE)) + list(
        workdir.rglob(checkpoints.MARKER)
    ):
        path.unlink()


def test_a_missing_digest_is_damage_and_the_record_is_kept(trained, tmp_path):
    """A digest deleted where this version saved (and the bytes flipped): the rerun of the
    finished run refuses in one line and results.json stays as it was."""
    workdir = _copy(trained, tmp_path)
    step = workdir / "best" / str(trained[1]["best_epoch"])
    (step / checkpoints.DIGEST_FILE).unlink()
    _damage(step)
    record = (workdir / "results.json").read_bytes()
    with pytest.raises(UserError, match=r"best/\d has no digest.sha256, which is written with"):
        train.train_and_evaluate(tiny_config(), str(workdir))
    assert (workdir / "results.json").read_bytes() == record


def test_a_checkpoint_without_digest_that_cannot_be_read_is_one_line(trained, tmp_path):
    workdir = _copy(trained, tmp_path)
    step = workdir / "best" / str(trained[1]["best_epoch"])
    _as_before_digests(workdir)
    _damage(step, truncate=True)
    with pytest.raises(UserError, match=r"cannot read the best checkpoint at .*: \S"):
        train.train_and_evaluate(tiny_config(), str(workdir))


def test_a_damaged_checkpoint_is_one_line_on_the_command_line(trained, tmp_path):
    """What orbax leaves behind an abandoned read never reaches the researcher's terminal."""
    workdir = _copy(trained, tmp_path)
    step = workdir / "best" / str(trained[1]["best_epoch"])
    _as_before_digests(workdir)
    _damage(step, truncate=True)
    config_file = tmp_path / "tiny.py"  # the fixture's config, for the command line
    config_file.write_text(
        "from tests.test_train import tiny_config\n\n\ndef get_config():\n"
        "    return tiny_config()\n"
    )
    r = subprocess.run(
        [sys.executable, "-m", "train.main", f"--config={config_file}", f"--workdir={workdir}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    errors = [line for line in r.stderr.splitlines() if not line.startswith("[backbone]")]
    assert r.returncode == 1, r.stderr
    assert len(errors) == 1 and errors[0].startswith("error: cannot read the best checkpoint"), (
        r.stderr
    )


CLOSED_LOOP_READ = """
import sys
from train import checkpoints


class Callback:  # collected after its event loop closed: reported through sys.unraisablehook
    def __init__(self, message):
        self.message = message

    def __del__(self):
        raise RuntimeError(self.message)


class Manager:  # a read that fails after TensorStore's callbacks have already printed
    directory = "best"

    def item_metadata(self, step):
        return None

    def restore(self, step, args):
        Callback("Event loop is closed")
        try:
            raise RuntimeError("Event loop is closed")
        except RuntimeError:
            sys.excepthook(*sys.exc_info())  # as PyErr_Print prints
        raise ValueError("Encountered error while reading array index")


checkpoints.verify = lambda *args: None
try:
    checkpoints.restore(Manager(), 1, {}, "best checkpoint")
except checkpoints.DamagedCheckpoint as e:
    print(f"error: {e}", file=sys.stderr)
Callback("another failure")  # still reported
"""


def test_a_failing_read_drops_closed_loop_reports_that_come_before_its_error():
    """TensorStore's callbacks into orbax's closed event loop can print before the failed read
    reaches the caller: dropped from the start of the read, every other report kept."""
    r = subprocess.run(
        [sys.executable, "-c", CLOSED_LOOP_READ], capture_output=True, text=True, timeout=120
    )
    lines = r.stderr.splitlines()
    assert r.returncode == 0 and "Event loop is closed" not in r.stderr, r.stderr
    expected = "cannot read the best checkpoint at best/1: Encountered error while reading array"
    assert lines[0] == f"error: {expected} index", r.stderr
    assert "RuntimeError: another failure" in lines, r.stderr


def test_losing_checkpoints_keeps_best_and_results(trained, tmp_path):
    workdir = _copy(trained, tmp_path)
    shutil.rmtree(workdir / "checkpoints")
    results_before = (workdir / "results.json").read_text()
    best_before = sorted(p.name for p in (workdir / "best").iterdir())
    with pytest.raises(UserError, match=r"holds no usable checkpoint.*Kept as they are: .*best"):
        train.train_and_evaluate(tiny_config(epochs=3), str(workdir))
    assert (workdir / "results.json").read_text() == results_before
    assert sorted(p.name for p in (workdir / "best").iterdir()) == best_before


def test_losing_best_says_how_to_rebuild_it(trained, tmp_path):
    workdir = _copy(trained, tmp_path)
    shutil.rmtree(workdir / "best")
    with pytest.raises(UserError, match=r"best is missing or empty.*new workdir"):
        train.train_and_evaluate(tiny_config(), str(workdir))


FULL_DISK = r"""
set -u
mount -t tmpfs -o size=3m tmpfs "$MNT" || exit 77
py=$1; shift
"$py" -m train.main "$@" > /dev/null 2>&1 || exit 3
dd if=/dev/zero of="$MNT/fill" bs=4k 2>/dev/null; truncate -s -200K "$MNT/fill"
"$py" -m train.main "$@" --config.backbone_training.num_epochs=3 > "$MNT/../full.out" 2>&1
echo "rc=$?" >> "$MNT/../full.out"
ls "$MNT/w/checkpoints" >> "$MNT/../full.out"
rm "$MNT/fill"
"$py" -m train.main "$@" --config.backbone_training.num_epochs=3 > "$MNT/../freed.out" 2>&1
echo "rc=$?" >> "$MNT/../freed.out"
"""


def test_a_real_full_disk_is_one_line_and_keeps_the_last_checkpoint(tmp_path):
    """A 3 MB tmpfs in a private mount namespace, filled between two runs: the checkpoint write
    fails in TensorStore (RESOURCE_EXHAUSTED), the run says so in one line, and once space is
    freed the same command resumes from the last complete checkpoint."""
    if not shutil.which("unshare"):
        pytest.skip("needs unshare(1) to make a small filesystem")
    mount = tmp_path / "mnt"
    mount.mkdir()
    (tmp_path / "run.sh").write_text(FULL_DISK.replace("$MNT", str(mount)))
    args = [
        "--config", "configs/toy_cifar10.py:smoke", "--config.stage=backbone",
        "--config.dataset.name=embedded", "--config.dataset.max_train_examples=64",
        "--config.dataset.max_test_examples=32", "--config.model.features=(8,16,32)",
        "--config.model.hidden=64", "--config.eval_batch_size=32", "--config.seed=3",
        "--config.backbone_training.patience=5", f"--workdir={mount}/w",
    ]  # fmt: skip
    r = subprocess.run(
        ["unshare", "-m", "sh", str(tmp_path / "run.sh"), sys.executable, *args],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if r.returncode == 77 or "unshare failed" in r.stderr or "Operation not permitted" in r.stderr:
        pytest.skip(f"cannot mount a small filesystem here: {r.stderr.strip()[:200]}")
    assert r.returncode == 0, r.stdout + r.stderr
    full = (tmp_path / "full.out").read_text()
    errors = [line for line in full.splitlines() if not line.startswith("[backbone]")]
    # the checkpoint's write (TensorStore) or, when its timer comes first, another writer's
    assert errors[0].startswith("error: could not write ") and (
        "no space left on" in errors[0].lower() and "rerun the same command" in errors[0]
    ), full
    assert errors[1:3] == ["rc=1", "1"] and "Traceback" not in full, full  # checkpoints/1 kept
    freed = (tmp_path / "freed.out").read_text()
    assert "resumed from epoch 1" in freed and freed.rstrip().endswith("rc=0"), freed


def test_a_resume_that_changes_what_is_trained_is_refused_naming_each_field(trained, tmp_path):
    workdir = _copy(trained, tmp_path)
    pinned = (workdir / "config.json").read_text()
    config = tiny_config()
    config.seed = 5
    config.backbone_training.learning_rate = 0.01
    config.dataset.max_train_examples = 100
    with pytest.raises(UserError) as e:
        train.train_and_evaluate(config, str(workdir))
    message = str(e.value)
    assert "\n" not in message and "Use a new workdir" in message
    for field in ("seed: 0 -> 5", "backbone_training.learning_rate: 0.001 -> 0.01",
                  "dataset.max_train_examples: 160 -> 100"):  # fmt: skip
        assert field in message
    assert (workdir / "config.json").read_text() == pinned  # the record keeps the first config


def test_safe_changes_are_accepted_and_recorded_per_process(trained, tmp_path):
    workdir = _copy(trained, tmp_path)
    pinned = (workdir / "config.json").read_text()
    config = tiny_config(epochs=3)
    config.log_every_steps = 2
    _, results = train.train_and_evaluate(config, str(workdir))
    assert results["epochs"] == 3 and (workdir / "config.json").read_text() == pinned
    changes = results["processes"][-1]["config_changes"]
    assert changes == {
        "backbone_training.num_epochs": [2, 3],
        "attention_training.num_epochs": [2, 3],  # tiny_config sets both stages' epochs
        "log_every_steps": [5, 2],
    }
    assert "config_changes" not in results["processes"][0]


def test_an_attention_run_refuses_another_backbone_and_analyses_check_the_digest(trained, tmp_path):
    from train.tools import trained as trained_tools

    backbone = _copy(trained, tmp_path)
    config = tiny_config(stage="attention", epochs=1)
    config.backbone_checkpoint = str(backbone)
    train.train_and_evaluate(config, str(tmp_path / "a"))
    _retrain(backbone / "best", trained[1]["best_epoch"])  # the backbone changes, digest and all
    with pytest.raises(UserError, match=r"backbone of .* has changed since it trained"):
        trained_tools.load(str(tmp_path / "a"))
    more = tiny_config(stage="attention", epochs=2)
    more.backbone_checkpoint = str(backbone)
    with pytest.raises(UserError, match="the backbone this run trains on has changed"):
        train.train_and_evaluate(more, str(tmp_path / "a"))


def _leaves(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


# Values a field may hold that the fuzzing below tries: a path or a name is any string, any
# finite alpha is an alpha, '' is no lesion, [1, 2] is a valid list of sizes, seeds or rates.
ACCEPTED = {
    ("attention.alpha_init", "-1"), ("attention.lesion", "None"),
    ("attention.lesion", "'x'"),  # checked against the sites by check_before_work
    ("backbone_checkpoint", "'x'"), ("dataset.data_dir", "'x'"), ("dataset.name", "'x'"),
    ("distributed.coordinator_address", "'x'"), ("model.features", "[1, 2]"),
    ("sweep.alpha_inits", "[1, 2]"), ("sweep.learning_rates", "[1, 2]"), ("sweep.seeds", "[1, 2]"),
}  # fmt: skip


def test_fuzzed_config_values_are_each_one_clear_error():
    """Every field of the toy config set to a wrong type, an empty string, NaN, None, a list or
    -1: one UserError naming the field (the lesion against the sites: check_before_work)."""
    from configs import toy_cifar10
    from train import defaults, validate

    accepted = set()
    for field, value in _leaves(toy_cifar10.get_config().to_dict()):
        for bad in ("x", "", float("nan"), None, [1, 2], -1):
            if type(bad) is type(value) and bad == value:
                continue
            tree = toy_cifar10.get_config().to_dict()
            *parents, name = field.split(".")
            node = tree
            for p in parents:
                node = node[p]
            node[name] = bad
            try:
                validate.check_config(defaults.complete(tree))
                accepted.add((field, repr(bad)))
            except UserError as e:
                assert field in str(e) and "\n" not in str(e), (field, bad, e)
    assert accepted == ACCEPTED


@pytest.mark.parametrize(
    "name, content",
    [("a.npz", b"hello"), ("b.safetensors", b""), ("c.pth", bytes(range(256)) * 4),
     ("d.npz", b"{}"), ("e.safetensors", b"\xff" * 64)],
)  # fmt: skip
def test_weights_files_of_the_wrong_format_are_one_line(tmp_path, name, content):
    from gattanet_jax import weights

    if name.endswith(".pth"):
        pytest.importorskip("torch")
    (tmp_path / name).write_bytes(content)
    with pytest.raises(weights.WeightsError, match="cannot read weights file") as e:
        weights.read_state_dict(str(tmp_path / name))
    assert "\n" not in str(e.value)


def test_a_rerun_that_computes_another_result_keeps_the_record(trained, tmp_path):
    """A finished run's rerun re-evaluates: a result other than the recorded one is refused in
    one line naming both values, and results.json stays as it was; a longer schedule trains on
    and keeps the earlier record beside the new one."""
    workdir = _copy(trained, tmp_path)
    original = (workdir / "results.json").read_text()
    record = json.loads(original) | {"test_accuracy": 0.5}
    (workdir / "results.json").write_text(json.dumps(record))
    with pytest.raises(UserError, match=r"records test_accuracy = 0.5, but this run computes "
                       r"0\.\d+ .*the record is kept"):  # fmt: skip
        train.train_and_evaluate(tiny_config(), str(workdir))
    assert json.loads((workdir / "results.json").read_text()) == record
    (workdir / "results.json").write_text(original)
    _, results = train.train_and_evaluate(tiny_config(), str(workdir))  # the same: rewritten
    assert results["test_accuracy"] == json.loads(original)["test_accuracy"]
    _, longer = train.train_and_evaluate(tiny_config(epochs=3), str(workdir))
    steps = json.loads(original)["steps"]
    assert longer["steps"] > steps
    assert json.loads((workdir / f"results.steps{steps}.json").read_text())["steps"] == steps


def test_a_lost_config_is_restored_from_its_copy_only_for_the_same_config(trained, tmp_path,
                                                                          capsys):  # fmt: skip
    workdir = _copy(trained, tmp_path)
    written = (workdir / "config.json").read_text()
    (workdir / "config.json").unlink()
    other = tiny_config()
    other.seed = 5
    with pytest.raises(UserError, match=r"seed: 0 -> 5"):
        train.train_and_evaluate(other, str(workdir))
    assert not (workdir / "config.json").exists()
    train.train_and_evaluate(tiny_config(), str(workdir))
    assert "config.json was missing: written again from its copy in pinned.json" in (
        capsys.readouterr().out
    )
    assert json.loads((workdir / "config.json").read_text()) == json.loads(written)
    (workdir / "config.json").unlink()
    (workdir / "pinned.json").unlink()
    with pytest.raises(UserError, match=r"config.json is missing, and nothing else in .* records"):
        train.train_and_evaluate(tiny_config(), str(workdir))


def test_a_lost_pin_is_checked_against_the_results_before_it_is_written_again(trained, tmp_path):
    backbone = _copy(trained, tmp_path)
    config = tiny_config(stage="attention", epochs=1)
    config.backbone_checkpoint = str(backbone)
    train.train_and_evaluate(config, str(tmp_path / "a"))
    (tmp_path / "a" / "pinned.json").unlink()
    best = checkpoints.manager(backbone / "best", keep=1, create=False)
    step = best.latest_step()
    variables = best.restore(step)["variables"]  # another backbone in its place
    checkpoints.save(best, step, {"variables": jax.tree.map(lambda x: x * 1.01, variables)})
    with pytest.raises(UserError, match=r"has changed: sha256 \w+\.\.\. in its results.json"):
        train.train_and_evaluate(config, str(tmp_path / "a"))
    pinned = json.loads((tmp_path / "a" / "pinned.json").read_text())  # its config copy only
    assert "backbone_checkpoint_sha256" not in pinned


def test_a_moved_workdir_resumes_and_is_analysed_from_its_new_place(tmp_path):
    from train.tools import trained as trained_tools

    config = tiny_config(stage="both", epochs=1)
    _, results = train.train_and_evaluate(config, str(tmp_path / "old" / "run"))
    (tmp_path / "old").rename(tmp_path / "new")  # the recorded absolute paths are gone
    moved = tmp_path / "new" / "run"
    loaded = trained_tools.load(str(moved / "attention"))
    assert loaded.config.backbone_checkpoint == str(moved / "backbone")
    _, again = train.train_and_evaluate(config, str(moved))
    assert again["test_accuracy"] == results["test_accuracy"]
    # a backbone outside the workdir that is gone: the recorded path and the flag, in one line
    shutil.copytree(moved / "backbone", tmp_path / "b")
    outside = tiny_config(stage="attention", epochs=1)
    outside.backbone_checkpoint = str(tmp_path / "b")
    train.train_and_evaluate(outside, str(tmp_path / "c"))
    shutil.rmtree(tmp_path / "b")
    with pytest.raises(UserError, match=r"frozen backbone of .*c is not where the run recorded "
                       r"it: .*/b; pass its place now with --backbone_checkpoint$"):  # fmt: skip
        trained_tools.load(str(tmp_path / "c"))
    trained_tools.load(str(tmp_path / "c"), backbone=str(moved / "backbone"))


CACHE_USE = """
import sys
from train import compilation
compilation.enable_cache()
import jax, jax.numpy as jnp
print(float(jax.jit(lambda x: jnp.sin(x) * 2 + 1)(jnp.ones(3)).sum()))
"""


def test_a_damaged_compilation_cache_entry_is_one_note(tmp_path):
    """An entry cut short (a crash while it was written): skipped and compiled again, said in
    one note instead of JAX's two warning lines per entry."""
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")  # fmt: skip
    first = subprocess.run([sys.executable, "-c", CACHE_USE], capture_output=True, text=True,
                           env=env, timeout=300)  # fmt: skip
    entries = [p for p in (tmp_path / "cache").iterdir() if p.is_file()]
    assert first.returncode == 0 and entries, first.stderr
    for entry in entries:
        entry.write_bytes(entry.read_bytes()[:50])
    again = subprocess.run([sys.executable, "-c", CACHE_USE], capture_output=True, text=True,
                           env=env, timeout=300)  # fmt: skip
    assert again.returncode == 0 and again.stdout.splitlines()[-1] == first.stdout.strip()
    notes = [line for line in again.stdout.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "damaged entry of the compilation cache" in notes[0], again.stdout
    assert "Warning" not in again.stderr and "Traceback" not in again.stderr, again.stderr


def test_damaged_records_of_a_workdir_are_named_or_set_aside(trained, tmp_path, capsys):
    """A history.jsonl damaged in its middle is set aside with a note (a log, not the run's
    state); a pinned.json that is not JSON is one line naming it."""
    workdir = _copy(trained, tmp_path)
    history = workdir / "history.jsonl"
    lines = history.read_text().splitlines()
    history.write_text("\n".join([lines[0], "garbage", *lines[1:]]) + "\n")
    train.train_and_evaluate(tiny_config(), str(workdir))
    assert "history.jsonl: line 2 is not an epoch record: set aside as" in capsys.readouterr().out
    assert (workdir / "history.jsonl.damaged").is_file()
    (workdir / "pinned.json").write_text("{not json")
    with pytest.raises(UserError, match=r"pinned.json is not readable \(.*\): it pins this run"):
        train.train_and_evaluate(tiny_config(), str(workdir))


# What each stage leaves unread (the toy config's defaults otherwise): set on the command line,
# each is refused in one line. Sections end in '.'.
UNUSED = {
    "backbone": {"backbone_checkpoint", "attention.", "attention_training.", "addon.",
                 "model.sites", "sweep.alpha_inits", "sweep.lesions", "sweep.layout"},
    "attention": {"backbone_training.", "addon.", "model.kernel_init", "model.dropout_rate",
                  "model.dropout_after", "attention_training.backbone_learning_rate",
                  "attention_training.backbone_batch_stats", "attention.cue_weight",
                  "sweep.layout"},
    "both": {"backbone_checkpoint", "addon.", "attention_training.backbone_learning_rate",
             "attention_training.backbone_batch_stats", "attention.cue_weight", "sweep.layout"},
    "addon": {"attention.", "model.sites", "sweep.alpha_inits", "sweep.lesions",
              "backbone_training.", "model.kernel_init", "model.dropout_rate",
              "model.dropout_after", "addon.heads", "sweep.layout"},
}  # fmt: skip


@pytest.mark.parametrize("stage", sorted(UNUSED))
def test_every_field_a_stage_does_not_read_is_refused_when_set(stage):
    """Every field of the config, set on the command line where the stage ignores it: one line
    naming it and the stage; every other field accepted."""
    from configs import toy_cifar10
    from train import validate

    config = toy_cifar10.get_config()
    config.stage = stage
    refused = set()
    for field, _ in _leaves(config.to_dict()):
        try:
            validate.check_overrides(config, {field})
        except UserError as e:
            assert f"config.{field} is not used by stage={stage!r}" in str(e), e
            assert f"remove --config.{field}" in str(e) and "\n" not in str(e)
            refused.add(field)
    expected = {
        field for field, _ in _leaves(config.to_dict())
        if any(field == p or (p.endswith(".") and field.startswith(p)) for p in UNUSED[stage])
    }  # fmt: skip
    assert refused == expected


def test_modes_that_read_more_fields_accept_them_and_overrides_are_found_in_both_forms():
    from configs import toy_cifar10
    from train import cli, validate

    config = toy_cifar10.get_config()
    config.attention_training.finetune_backbone = True
    config.attention.cue_classes = True
    config.sweep.seeds = (0, 1)
    validate.check_overrides(config, {"attention_training.backbone_learning_rate",
                                      "model.dropout_rate", "attention.cue_weight",
                                      "sweep.layout"})  # fmt: skip
    config.stage, config.addon.from_scratch, config.addon.kind = "addon", True, "gsa_conv"
    validate.check_overrides(config, {"backbone_training.learning_rate", "addon.heads"})
    for field in ("backbone_checkpoint", "attention_training.learning_rate", "addon.reduction"):
        with pytest.raises(UserError, match=f"config.{field} is not used by stage='addon'"):
            validate.check_overrides(config, {field})
    argv = ["x", "--config=configs/toy_cifar10.py", "--config.seed=3", "--config.attention.d",
            "8", "--config.stage", "backbone"]  # fmt: skip
    final = toy_cifar10.get_config()
    final.seed, final.attention.d, final.stage = 3, 8, "backbone"
    assert cli.overridden_fields(final, argv) == {"seed", "attention.d", "stage"}
