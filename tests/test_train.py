"""train_and_evaluate end to end: both stages, resume, and clear errors for bad input."""

import contextlib
import json
import logging
import re
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import toy_cifar10
from gattanet_jax import count_params
from train import checkpoints, pin, progress, train
from train.errors import UserError

COMMIT = r"[0-9a-f]{40}(\+changes)?"  # a checkout's commit, marked if its files differ


def tiny_config(stage="backbone", epochs=2, **dataset):
    config = toy_cifar10.get_config("smoke")
    config.stage = stage
    config.dataset.name = "embedded"
    config.dataset.max_train_examples = 160
    config.dataset.max_test_examples = 64
    config.dataset.update(dataset)
    config.model.features = (4, 8, 8)
    config.model.hidden = 16
    for t in (config.backbone_training, config.attention_training):
        t.batch_size = 32
        t.num_epochs = epochs
        t.patience = 10
    config.eval_batch_size = 50
    return config


@contextlib.contextmanager
def compilations():
    """The names of the functions XLA compiles within the block (jit(train_step), ...)."""
    names = []

    class Names(logging.Handler):
        def emit(self, record):
            found = re.match(r"Finished XLA compilation of (\S+)", record.getMessage())
            if found:
                names.append(found.group(1))

    logger, handler = logging.getLogger("jax._src.dispatch"), Names(logging.DEBUG)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        with jax.log_compiles(True):
            yield names
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def assert_trees_equal(a, b):
    for x, y in zip(leaves(a), leaves(b), strict=True):
        assert not np.issubdtype(x.dtype, np.floating) or np.all(np.isfinite(x))  # NaN == NaN
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def backbone_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("backbone")
    state, results = train.train_and_evaluate(tiny_config(), str(workdir))
    return workdir, state, results


def test_backbone_stage_writes_results_and_checkpoints(backbone_run):
    workdir, _, results = backbone_run
    saved = json.loads((workdir / "results.json").read_text())
    assert saved["stage"] == "backbone" and saved["epochs"] == 2 and saved["steps"] == 8
    assert saved == results
    env = saved["environment"]  # what produced the result
    assert env["jax"] == jax.__version__ and env["device_count"] == jax.device_count()
    assert env["device_kind"] and env["flax"] and env["optax"]
    assert env["git_commit"] is None or re.fullmatch(COMMIT, env["git_commit"])
    # the one process that trained it: its code, start and steps
    (process,) = saved["processes"]
    assert process["from_step"] == 0 and process["to_step"] == 8
    assert 0 < process["wall_time_s"] <= saved["wall_time_s"]
    assert process["git_commit"] == env["git_commit"] and process["started"].endswith("Z")
    # test accuracy and loss are the best checkpoint's, recomputed here from the test split
    assert_matches_the_best_checkpoint(workdir, results)
    assert (workdir / "best").is_dir() and (workdir / "checkpoints" / "2").is_dir()
    assert list((workdir / "tensorboard").iterdir())


def test_rerunning_a_finished_run_keeps_its_results_and_training_time(backbone_run, tmp_path):
    import shutil

    workdir, _, results = backbone_run
    elapsed = json.loads((workdir / "elapsed.json").read_text())
    saved = elapsed["wall_time_s"]
    assert saved == results["wall_time_s"] > 0 and elapsed["processes"] == results["processes"]
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy)
    time.sleep(1.0)
    _, again = train.train_and_evaluate(tiny_config(), str(copy))
    assert again["wall_time_s"] == saved  # nothing trained: no time added, no process
    assert again["processes"] == results["processes"]
    for key in ("test_accuracy", "test_loss", "best_epoch", "steps"):
        assert again[key] == results[key], key


def test_the_frozen_variables_have_one_shape_in_every_mode(backbone_run):
    """{'backbone': the frozen backbone's variables} wherever there is one, else {}."""
    from train import addon_tasks, models, tasks

    workdir, _, _ = backbone_run
    modes = {
        "backbone": ("backbone", {}),
        "attention": ("attention", {}),
        "fine-tuning": ("attention", {"attention_training.finetune_backbone": True}),
        "add-on": ("addon", {}),
        "add-on from scratch": ("addon", {"addon.from_scratch": True}),
    }
    make = {
        "backbone": tasks.backbone_task,
        "attention": tasks.attention_task,
        "addon": addon_tasks.addon_task,
    }
    backbone_vars = None
    for mode, (stage, fields) in modes.items():
        config = tiny_config(stage)
        config.backbone_checkpoint = str(workdir)
        config.update_from_flattened_dict(fields)
        backbone = models.build_backbone(config)
        task = make[stage](config, backbone, jax.random.key(0))
        if stage == "backbone" or "addon.from_scratch" in fields:
            assert task.frozen == {}, mode
            continue
        assert list(task.frozen) == ["backbone"], mode
        assert sorted(task.frozen["backbone"]) == ["params"], mode  # the toy CNN's variables
        backbone_vars = backbone_vars or task.frozen["backbone"]
        assert_trees_equal(task.frozen["backbone"], backbone_vars)


def assert_matches_the_best_checkpoint(workdir, results):
    import optax

    from train import models
    from train.data import input_pipeline

    config = tiny_config()
    backbone = models.build_backbone(config)
    best = checkpoints.manager(workdir / "best", keep=1, create=False)
    assert best.latest_step() == results["best_epoch"]
    variables = best.restore(best.latest_step())["variables"]
    test = input_pipeline.load(config, models.image_shape(config)).test
    logits = backbone.apply(variables, np.asarray(test.images, np.float32) / 255.0)
    labels = np.asarray(test.labels)
    assert len(labels) == 64
    accuracy = float(np.mean(np.argmax(logits, -1) == labels))
    loss = float(np.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels)))
    assert results["test_accuracy"] == pytest.approx(accuracy, abs=1e-9)
    assert results["test_loss"] == pytest.approx(loss, rel=1e-5)


def test_early_stopping_stops_the_run(tmp_path, capsys):
    """Learning rate ~0: validation accuracy never beats epoch 1's, so patience 2 stops the run
    after epoch 3 of 50 and says so, and each epoch's line says when it would."""
    config = tiny_config(epochs=50)
    config.backbone_training.patience = 2
    config.backbone_training.learning_rate = 1e-12
    _, results = train.train_and_evaluate(config, str(tmp_path))
    assert results["epochs"] == 3 and results["early_stopped"] is True
    assert results["best_epoch"] == 1 and results["steps"] == 3 * 4
    lines = [x for x in capsys.readouterr().out.splitlines() if "val_acc" in x]
    assert len(lines) == 3
    assert all("early stop at epoch 3 (" in x for x in lines[:2])
    assert "early stop at" not in lines[2]  # it stops there


def test_progress_lines_within_an_epoch_in_any_output(tmp_path, capsys, monkeypatch):
    """Not a terminal (pytest captures stdout): lines every log_every_steps steps anyway."""
    # Only the step count here: the 30-second line would also print after a step (the first,
    # which compiles) that a loaded machine makes slower than that.
    monkeypatch.setattr(progress.StepLog.__init__, "__defaults__", (float("inf"),))
    config = tiny_config(epochs=1, max_train_examples=640)
    config.log_every_steps = 4
    train.train_and_evaluate(config, str(tmp_path))
    lines = [x for x in capsys.readouterr().out.splitlines() if " step " in x]
    # 576 training images, batch 32: 18 steps; lines at steps 4, 8, 12 and 16
    assert [x.split(" step ")[1].split()[0] for x in lines] == ["4/18", "8/18", "12/18", "16/18"]
    assert all("loss " in x and "steps/s" in x and "run ETA" in x for x in lines)


def test_a_progress_line_after_seconds_without_one_between_the_step_counts(monkeypatch):
    """A slow step (a compile, a loaded machine) gets a line once ``seconds`` have passed since
    the last, whatever its index; never the epoch's last step, whose epoch line follows."""
    now = [100.0]
    monkeypatch.setattr(progress.time, "time", lambda: now[0])
    step_log = progress.StepLog("attention", 10, 1, writer=None, every=4, seconds=30.0)
    step_log.start_epoch(0)
    now[0] = 131.0
    assert step_log.due(0)  # 31 s since the epoch began: a line at step 1 of an every-4 log
    step_log.last = 131.0  # as report() sets it
    now[0] = 140.0
    assert not step_log.due(1)  # 9 s since, and step 2 is no multiple of 4
    assert step_log.due(3)  # step 4
    now[0] = 500.0
    assert not step_log.due(9)  # long since, but the epoch's last step


def test_epoch_rate_and_eta_count_the_steps_a_resumed_epoch_ran(monkeypatch):
    """An epoch resumed at its step 75 of 100 ran 25 steps: its steps/s and the run's ETA come
    from those 25 steps' time, not from a whole epoch's steps in a quarter of the time."""
    from types import SimpleNamespace

    from train import run

    monkeypatch.setattr(run.time, "time", lambda: 1000.0)
    fake = SimpleNamespace(
        epoch_times=[], steps_this_epoch=25, steps_per_epoch=100,
        recipe=SimpleNamespace(num_epochs=12), meta={"epoch": 2},
    )  # fmt: skip
    rate, eta = run.Run.timing(fake, t0=995.0)  # 25 steps in 5 s: 0.2 s a step
    assert rate == pytest.approx(5.0)
    assert eta == "3m20s"  # 10 epochs left x 100 steps x 0.2 s
    fake.steps_this_epoch, fake.meta["epoch"] = 100, 3  # a whole epoch next, 0.1 s a step
    rate, eta = run.Run.timing(fake, t0=990.0)
    assert rate == pytest.approx(10.0)
    assert eta == "2m15s"  # 9 epochs x 100 steps x the median of 0.2 and 0.1 s a step
    for epoch in (4, 5, 6):  # 0.1 s a step, then an epoch during which the process was paused
        fake.meta["epoch"] = epoch
        run.Run.timing(fake, t0=990.0)
    fake.meta["epoch"] = 7
    rate, eta = run.Run.timing(fake, t0=0.0)
    assert rate == pytest.approx(0.1)
    assert eta == "0m50s"  # 5 epochs x 100 steps x 0.1 s, the median of the last five epochs


def test_resume_equals_an_uninterrupted_run(backbone_run, tmp_path):
    workdir, state, results = backbone_run
    train.train_and_evaluate(tiny_config(epochs=1), str(tmp_path))
    with open(tmp_path / "history.jsonl", "a") as f:  # an epoch of a trajectory the run left
        f.write('{"epoch": 2, "val_accuracy": -1}\n')
    resumed_state, resumed = train.train_and_evaluate(tiny_config(epochs=2), str(tmp_path))
    assert_trees_equal(resumed_state["state"]["params"], state["state"]["params"])
    history = (tmp_path / "history.jsonl").read_text()
    assert history == (workdir / "history.jsonl").read_text() and history.count("\n") == 2
    assert resumed["test_accuracy"] == results["test_accuracy"]
    assert resumed["steps"] == results["steps"]
    # each process's code and steps, and the time of both
    assert [(p["from_step"], p["to_step"]) for p in resumed["processes"]] == [(0, 4), (4, 8)]
    assert resumed["wall_time_s"] == pytest.approx(
        sum(p["wall_time_s"] for p in resumed["processes"]), abs=0.2
    )


def test_the_recorded_commit_says_when_tracked_files_differ_from_it(tmp_path):
    from train import progress

    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    assert progress.git_commit(tmp_path) is None  # not a checkout
    git("init", "-q")
    (tmp_path / "code.py").write_text("a = 1\n")
    git("add", "code.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "code")
    clean = progress.git_commit(tmp_path)
    assert re.fullmatch(r"[0-9a-f]{40}", clean)
    (tmp_path / "notes.txt").write_text("untracked\n")
    assert progress.git_commit(tmp_path) == clean
    (tmp_path / "code.py").write_text("a = 2\n")
    assert progress.git_commit(tmp_path) == clean + "+changes"
    (tmp_path / "export").mkdir()  # a copy of the code inside another repository
    assert progress.git_commit(tmp_path / "export") is None


def test_attention_stage_trains_only_the_attention_tree(backbone_run, tmp_path):
    backbone_dir, _, _ = backbone_run
    best = checkpoints.manager(backbone_dir / "best", keep=1, create=False)
    before = best.restore(best.latest_step())
    config = tiny_config("attention", epochs=1)
    config.backbone_checkpoint = str(backbone_dir)
    with compilations() as compiled:
        state, results = train.train_and_evaluate(config, str(tmp_path))
    # once: the state is committed to the device from its first step on, as the restored
    # frozen backbone (and so every step's output) is
    assert compiled.count("jit(train_step)") == 1, compiled
    # validation (16 examples) and test (64) share one evaluation step; the frozen backbone
    # alone has its own
    assert compiled.count("jit(eval_batch)") == 2, compiled
    assert results["trainable_params"] == count_params(state["params"]) < 2_000
    assert sorted(state["params"]) == ["conv1", "conv2", "conv3", "dense1", "logits"]
    assert "backbone_test_accuracy" in results and "alpha" in results
    opt_state_leaves = jax.tree.leaves(state["state"]["opt_state"])
    assert sum(x.size for x in opt_state_leaves) < 2 * 2_000 + 10  # Adam moments of attention
    after = best.restore(best.latest_step())
    assert_trees_equal(after, before)


def test_a_backbone_whose_training_has_not_ended_is_named_as_such(backbone_run, tmp_path, capsys):
    import shutil

    from train import models, tasks

    backbone_dir, _, _ = backbone_run
    config = tiny_config("attention")
    for name, finished in (("done", True), ("running", False)):
        shutil.copytree(backbone_dir, tmp_path / name)
        if not finished:
            (tmp_path / name / "results.json").unlink()
        config.backbone_checkpoint = str(tmp_path / name)
        capsys.readouterr()
        tasks.load_backbone(config, models.build_backbone(config))
        note = capsys.readouterr().out
        assert ("has not finished training" in note) != finished
    assert f"note: the backbone in {tmp_path / 'running'} has not finished training (no " in note
    assert "last checkpoint is of epoch 2): its best checkpoint so far, of epoch" in note


def test_attention_stage_without_a_backbone_checkpoint(tmp_path):
    config = tiny_config("attention")
    config.backbone_checkpoint = str(tmp_path / "nowhere")
    with pytest.raises(UserError, match=r"backbone checkpoint .* not found"):
        train.train_and_evaluate(config, str(tmp_path / "new" / "wd"))
    assert not (tmp_path / "new").exists()  # the refused start made nothing that stays
    (tmp_path / "mine").mkdir()  # a folder that was there before is the user's: it stays
    with pytest.raises(UserError, match=r"backbone checkpoint .* not found"):
        train.train_and_evaluate(config, str(tmp_path / "mine"))
    assert (tmp_path / "mine").is_dir()


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_checkpoint_of_an_incompatible_config_lists_the_mismatches(backbone_run, tmp_path, api):
    backbone_dir, _, _ = backbone_run
    config = tiny_config("attention")
    config.backbone_checkpoint = str(backbone_dir)
    config.model.hidden = 24
    config.model.api = api
    with pytest.raises(
        UserError,
        match=r"does not fit this config: .*dense1/kernel: checkpoint "
        r"\(128, 16\), model \(128, 24\)",
    ):
        train.train_and_evaluate(config, str(tmp_path))


def test_rerun_with_an_incompatible_config_overwrites_nothing(backbone_run):
    workdir, _, _ = backbone_run
    before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
    config = tiny_config()
    config.model.features = (4, 8, 12)
    # refused by the pinned config before the checkpoints are read (a checkpoint that does not
    # fit the model is test_checkpoint_of_an_incompatible_config...'s case)
    changed = (
        r"a resume may not change what is trained: model\.features: \[4, 8, 8\] -> \[4, 8, 12\]"
    )
    with pytest.raises(UserError, match=changed):
        train.train_and_evaluate(config, str(workdir))
    config = tiny_config()
    config.model.api = "nnx"  # the same variables, another implementation: pinned too
    with pytest.raises(UserError, match=r"model\.api: 'linen' -> 'nnx'"):
        train.train_and_evaluate(config, str(workdir))
    after = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
    assert after == before


def test_both_stages_in_one_command(tmp_path):
    config = tiny_config("both", epochs=1)
    _, results = train.train_and_evaluate(config, str(tmp_path))
    assert (tmp_path / "backbone" / "results.json").exists()
    assert results["stage"] == "attention"
    assert results["backbone_stage"]["stage"] == "backbone"


def test_diverging_learning_rate_stops_naming_the_step_and_keeps_the_good_checkpoint(
    tmp_path, monkeypatch
):
    train.train_and_evaluate(tiny_config(epochs=1), str(tmp_path))
    # Updates that turn non-finite in epoch 2, made here by a learning rate the pinned config
    # would refuse on a resume: the pin is lifted for this test.
    monkeypatch.setattr(pin, "check", lambda config, path: {})
    saved = [*(tmp_path / "checkpoints").rglob("*"), *(tmp_path / "best").rglob("*")]
    before = {p: p.read_bytes() for p in saved if p.is_file()}
    config = tiny_config(epochs=3)
    config.backbone_training.learning_rate = 1e30
    with pytest.raises(
        UserError,
        match=r"non-finite loss or gradient at step (\d+) \(epoch 2\)"
        r".*last good checkpoint: .*checkpoints/1$",
    ) as err:
        train.train_and_evaluate(config, str(tmp_path))
    assert int(err.value.args[0].split("step ")[1].split()[0]) > 4  # after epoch 1's 4 steps
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p in before}
    assert after == before
    assert not (tmp_path / "checkpoints" / "2").exists()


def test_batch_larger_than_the_data(tmp_path):
    config = tiny_config()
    config.backbone_training.batch_size = 1024
    with pytest.raises(UserError, match="batch size 1024 exceeds"):
        train.train_and_evaluate(config, str(tmp_path))


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, timeout=300
    )


def test_cli_unknown_config_field_suggests_the_right_one(tmp_path):
    r = run_cli(
        "train.main",
        "--config",
        "configs/toy_cifar10.py",
        "--workdir",
        str(tmp_path),
        "--config.attention.dd=3",
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        "error: unknown config field 'attention.dd'; did you mean 'attention.d'?"
    )
    assert not list(tmp_path.iterdir())


def test_cli_missing_dataset_is_one_line(tmp_path):
    r = run_cli(
        "train.main",
        "--config",
        "configs/toy_cifar10.py",
        "--workdir",
        str(tmp_path / "wd"),
        f"--config.dataset.data_dir={tmp_path / 'tfds'}",
        "--config.stage=backbone",
    )
    assert r.returncode == 1
    said = [line for line in r.stderr.strip().splitlines() if not line.startswith("[backbone]")]
    assert len(said) == 1, r.stderr  # nothing from tfds about the folders it did not find
    assert said[0].startswith("error: dataset 'local_cifar10' split 'train' is not prepared in ")


def test_summary_prints_table_1_counts():
    r = run_cli("train.summary", "--config", "configs/toy_cifar100.py", "--config.attention.d=32")
    out = json.loads(r.stdout)
    assert out["backbone_params"] == 643_492 and out["attention_params"] == 37_445
    assert [s["kind"] for s in out["sites"]] == ["conv", "conv", "conv", "dense", "dense"]


def test_a_crash_within_an_epoch_resumes_there_and_ends_as_an_uninterrupted_run(
    tmp_path, monkeypatch
):
    from train import parallel

    config = tiny_config(epochs=2)
    config.checkpoint_every_steps = 2  # 4 steps per epoch: a save after steps 2 and 6
    straight_state, straight = train.train_and_evaluate(config, str(tmp_path / "straight"))

    compile_ = parallel.Placement.compile

    def crash_after(calls):
        def compile_and_count(self, step, donate_state=False):
            fn = compile_(self, step, donate_state)
            if not donate_state:  # the eval step
                return fn
            count = {"n": 0}

            def counted(*args):
                count["n"] += 1
                if count["n"] > calls:
                    raise KeyboardInterrupt("simulated crash")
                return fn(*args)

            return counted

        return compile_and_count

    monkeypatch.setattr(parallel.Placement, "compile", crash_after(7))  # in epoch 2, step 7
    with pytest.raises(KeyboardInterrupt):
        train.train_and_evaluate(config, str(tmp_path / "crashed"))
    monkeypatch.undo()
    state, results = train.train_and_evaluate(config, str(tmp_path / "crashed"))
    assert results["steps"] == straight["steps"] == 8
    for key in ("test_accuracy", "test_loss", "best_validation_accuracy", "best_epoch"):
        assert results[key] == straight[key], key
    assert_trees_equal(state["state"], straight_state["state"])
