"""The benchmark suite's --quick run: every part runs in its own process within its cap and is
written, so the suite is known to work before a GPU sees it."""

import json
import math
import sys

from benchmarks import suite


def test_quick_suite_measures_every_part_and_writes_json_and_markdown(tmp_path):
    results = suite.run_suite(
        str(tmp_path / "out"), quick=True, data_dir=str(tmp_path), budget_s=900
    )
    saved = json.loads((tmp_path / "out" / "suite.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert list(saved["parts"]) == [name for name, _ in suite.PARTS]
    assert {p["status"] for p in saved["parts"].values()} == {"done"}
    toy = saved["toy_float32"] + saved["toy_bfloat16"]
    assert [(t["dtype"], t["batch"]) for t in toy] == [("float32", 8), ("bfloat16", 8)]
    for row in toy:
        assert row["attention_images_per_s"] > 0 and row["backbone_train_images_per_s"] > 0
        assert row["attention_compile_s"] > 0 and row["backbone_train_compile_s"] > 0
    assert [s["members"] for s in saved["sweep"]] == [1, 2]
    assert [(s["stage"], s["layout"], s["members"]) for s in saved["seeds"]] == [
        ("backbone", "vmap", 2), ("backbone", "loop", 2), ("attention", "vmap", 2),
        ("attention", "loop", 2),
    ]  # fmt: skip
    assert all(s["cost_ratio"] > 0 and s["single_step_s"] > 0 for s in saved["seeds"])
    assert all(s["step_s"] > 0 and s["compile_s"] > 0 for s in saved["sweep"])
    (rn,) = saved["resnet50"]
    for name in ("attention_step", "backbone_train_step"):
        step = rn[name]
        assert step["flops"] > 0 and math.isfinite(step["flops"]) and step["images_per_s"] > 0
        assert step["fraction_of_peak"] is None  # a CPU has no entry in the peak table
    backbone, attention = saved["protocol"]
    for stage in (backbone, attention):
        assert stage["dataset"] == "embedded"  # nothing prepared in data_dir
        assert stage["epochs"] == 1 and stage["epoch_s"] > 0 and stage["first_step_s"] > 0
        count = stage["test_accuracy"] * 256  # correct answers of 256 test images
        assert abs(count - round(count)) < 1e-6
    errors = {p["policy"]: p["relative_error"] for p in saved["precision"]}
    assert set(errors) == {"float32", "tensorfloat32", "xla default"}
    assert errors["float32"] < 1e-5  # a CPU computes float32 whatever it is told
    assert saved["machine"]["jax"] and saved["machine"]["device_kind"]
    assert saved["machine"]["commit"]  # the package's own, or 'unknown'
    md = (tmp_path / "out" / "suite.md").read_text()
    headings = ("## Toy model", "## vmap sweep", "## Seeds in", "## ResNet50", "## Toy protocol")
    for heading in (*headings, "float64"):
        assert heading in md
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "suite.json", "suite.log", "suite.md"
    ]  # fmt: skip
    assert suite.peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12


def test_a_part_past_its_cap_is_stopped_and_keeps_its_rows(tmp_path):
    rows = tmp_path / "rows.jsonl"
    slow = (
        f"import json, time; open({str(rows)!r}, 'a').write(json.dumps({{'batch': 128}}) + '\\n');"
        " time.sleep(60)"
    )
    with open(tmp_path / "log", "w") as log:
        status, wall = suite.start_part([sys.executable, "-c", slow], 3.0, log)
    assert status == "timed out" and 2.5 < wall < 30
    assert suite.read_rows(rows) == [{"batch": 128}]


def test_a_spent_budget_skips_the_remaining_parts(tmp_path):
    results = suite.run_suite(str(tmp_path / "out"), quick=True, data_dir=str(tmp_path), budget_s=5)
    assert {p["status"] for p in results["parts"].values()} == {"skipped: budget spent"}
    saved = json.loads((tmp_path / "out" / "suite.json").read_text())
    assert list(saved["parts"]) == [name for name, _ in suite.PARTS]
