"""The benchmark suite's --quick run: every part runs and is written, so the suite is known to
work before a GPU sees it."""

import json
import math

from benchmarks import suite


def test_quick_suite_measures_every_part_and_writes_json_and_markdown(tmp_path):
    results = suite.run_suite(str(tmp_path / "out"), quick=True, data_dir=str(tmp_path))
    saved = json.loads((tmp_path / "out" / "suite.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert [(t["dtype"], t["batch"]) for t in saved["toy"]] == [("float32", 8), ("bfloat16", 8)]
    for row in saved["toy"]:
        assert row["attention_images_per_s"] > 0 and row["backbone_train_images_per_s"] > 0
    assert [s["members"] for s in saved["sweep"]] == [1, 2]
    assert all(s["step_s"] > 0 for s in saved["sweep"])
    for name in ("attention_step", "backbone_train_step"):
        step = saved["resnet50"][name]
        assert step["flops"] > 0 and math.isfinite(step["flops"]) and step["images_per_s"] > 0
        assert step["fraction_of_peak"] is None  # a CPU has no entry in the peak table
    protocol = saved["protocol"]
    assert protocol["dataset"] == "embedded"  # nothing prepared in data_dir
    for stage in ("backbone", "attention"):
        assert protocol[stage]["epochs"] >= 1 and protocol[stage]["wall_s"] > 0
        count = protocol[stage]["test_accuracy"] * 256  # correct answers of 256 test images
        assert abs(count - round(count)) < 1e-6
    assert saved["machine"]["jax"] and saved["machine"]["device_kind"]
    md = (tmp_path / "out" / "suite.md").read_text()
    for heading in ("## Toy model", "## vmap sweep", "## ResNet50", "## Toy protocol"):
        assert heading in md
    assert suite.peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
