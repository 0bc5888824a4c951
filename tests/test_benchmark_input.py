"""benchmarks.input: the generated dataset is ImageNet-shaped and read by the real pipeline."""

import numpy as np

from benchmarks import input as input_bench


def test_the_input_benchmark_reads_generated_jpegs_through_the_imagenet_pipeline(tmp_path):
    results = input_bench.run(str(tmp_path), examples=40, batch=8, n_batches=3, workers=2)
    assert results["train_images_per_s"] > 0 and results["eval_images_per_s"] > 0
    source = input_bench.prepare(str(tmp_path), 40).as_data_source(split="train")
    sides = np.array([source[i]["image"].shape[:2] for i in range(len(source))])
    assert len(source) == 40 and sides.min() >= 300 and sides.max() <= 500
    assert (tmp_path / "synthetic_imagenet").is_dir()
    assert list((tmp_path / "synthetic_imagenet").rglob("*.array_record*"))
