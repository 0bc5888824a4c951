"""The README's Python example runs as written."""

import re
from pathlib import Path


def test_readme_python_example_runs(capsys):
    text = (Path(__file__).parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "the README has no python example"
    exec(compile(blocks[0], "README.md", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "15845"
    assert out[1] == "(8, 10) (8, 16) (8, 32, 32)"


def test_readme_nnx_examples_run(capsys):
    text = (Path(__file__).parent.parent / "README.md").read_text()
    section = text.split("## Your own model: Linen or NNX", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2
    scope = {}
    for block in blocks:  # the second goes on from the first
        exec(compile(block, "README.md", "exec"), scope)
    out = capsys.readouterr().out.splitlines()
    assert out == ["(8, 10) ['conv1', 'conv2', 'conv3', 'dense1', 'logits']", "True"]
