"""The precision policy reaches every dot and convolution of the compiled training and
evaluation steps: toy backbone and GAttANet, ResNet with the paper's attention variant, GALA, SE
and GSA."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src import config as jax_config

from configs import compare_toy_cifar10, resnet18_imagenet
from train import models, precision, steps, tasks, train
from train.run import Run

from .test_resnet import random_state_dict
from .test_train import tiny_config

OPS = ("stablehlo.dot_general", "stablehlo.convolution")


def precisions(text: str) -> dict[str, list[str]]:
    """Each dot's and convolution's operand precisions in a StableHLO module, by op."""
    found = {op: [] for op in OPS}
    for line in text.splitlines():
        for op in OPS:
            if f"{op} " in line or f"{op}(" in line:
                names = re.findall(r"precision = \[(\w+), (\w+)\]", line) or re.findall(
                    r"#stablehlo<precision (\w+)>, #stablehlo<precision (\w+)>", line
                )
                found[op] += [p for pair in names for p in pair] or ["MISSING"]
    return found


def assert_all(text: str, expected: str):
    found = precisions(text)
    assert len(found["stablehlo.dot_general"]) + len(found["stablehlo.convolution"]) >= 4
    wrong = {op: sorted(set(p) - {expected}) for op, p in found.items() if set(p) - {expected}}
    assert not wrong, f"operands not at {expected}: {wrong}"


def step_modules(config, workdir) -> tuple[str, str]:
    """The StableHLO of the run's compiled training step and evaluation step, lowered under the
    run's policy as the training loop lowers them."""
    with precision.scope(config):
        run = Run(config, str(workdir))
        run.skip = False
        args = next(run.batches().epoch(0))
        train_text = run.compile_step().lower(run.state, run.task.frozen, *args).as_text()
        images, labels = next(iter(run.data.validation.eval_batches(config.eval_batch_size)))
        evaluation = tasks._eval_step(run.task.logits_fn, config.eval_batch_size, run.place)
        variables = steps.variables(run.state)
        eval_text = evaluation.lower(
            variables, run.task.frozen, images, labels, jnp.int32(0)
        ).as_text()
    return train_text, eval_text


def test_the_training_loop_compiles_every_dot_and_convolution_at_the_policy(tmp_path):
    """Every module a two-stage run lowers (steps, evaluation, guards) as JAX dumps them."""
    config = tiny_config(stage="both", epochs=1)
    before = jax_config.jax_dump_ir_to.value
    jax.config.update("jax_dump_ir_to", str(tmp_path / "ir"))
    try:
        train.train_and_evaluate(config, str(tmp_path / "run"))
    finally:
        jax.config.update("jax_dump_ir_to", before)
    modules = {p.name: p.read_text() for p in (tmp_path / "ir").glob("*.mlir")}
    steps_seen = [name for name in modules if "train_step" in name or "eval_batch" in name]
    assert len(steps_seen) >= 4, sorted(modules)  # both stages' training and evaluation steps
    for name, text in modules.items():
        found = precisions(text)
        for op in OPS:
            assert set(found[op]) <= {"HIGHEST"}, (name, op, found[op])


@pytest.mark.parametrize("choice, hlo", [("float32", "HIGHEST"), ("tensorfloat32", "HIGH")])
def test_toy_attention_steps_carry_the_chosen_precision(tmp_path, choice, hlo):
    config = tiny_config(stage="attention")
    config.backbone_checkpoint = "pretrained/toy_cifar10_s0/backbone"
    config.model.features, config.model.hidden = (32, 64, 128), 256  # the shipped backbone
    config.model.precision = choice
    for text in step_modules(config, tmp_path):
        assert_all(text, hlo)


def test_bfloat16_runs_keep_xla_default_precision(tmp_path):
    config = tiny_config()
    config.model.dtype = "bfloat16"
    for text in step_modules(config, tmp_path):
        assert_all(text, "DEFAULT")


def test_resnet_attention_variant_steps_are_float32(tmp_path):
    config = resnet18_imagenet.get_config("tiny")
    config.dataset.update(
        pipeline="memory", name="embedded", image_shape=(32, 32, 3), max_train_examples=64
    )
    config.attention_training.augment = False
    model = models.build_backbone(config)
    np.savez(tmp_path / "r.npz", **random_state_dict(model, (32, 32, 3)))
    config.backbone_checkpoint = str(tmp_path / "r.npz")
    for text in step_modules(config, tmp_path / "wd"):
        assert_all(text, "HIGHEST")


@pytest.mark.parametrize("system", ["gala", "se", "gsa"])
def test_comparison_systems_steps_are_float32(tmp_path, system):
    config = compare_toy_cifar10.get_config(f"{system},scratch,smoke")
    reference = tiny_config()
    config.dataset = reference.dataset
    config.model.features, config.model.hidden = (8, 8, 8), 16
    config.eval_batch_size = reference.eval_batch_size
    for text in step_modules(config, tmp_path):
        assert_all(text, "HIGHEST")


@pytest.mark.reference
def test_reference_tests_run_at_the_default_policy():
    assert jax_config.default_matmul_precision.value == precision.DEFAULT == "float32"
