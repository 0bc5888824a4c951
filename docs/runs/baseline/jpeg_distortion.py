"""How far re-encoding the CIFAR-10 JPEG copy moves its images (the ``dataset.jpeg_quality``
probe of docs/RESULTS.md, "What moves the toy baseline"): PSNR and mean absolute difference
against the copy, and the share of images left unchanged, on the test split.

  python docs/runs/baseline/jpeg_distortion.py [--data_dir data/tfds] [--qualities 75,50,25]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

from train.data import input_pipeline, sources  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default="data/tfds")
    parser.add_argument("--name", default="local_cifar10")
    parser.add_argument("--qualities", default="75,50,25")
    args = parser.parse_args()
    splits, _ = input_pipeline.read_tfds(args.name, args.data_dir)
    copy = splits["test"].images
    print("| re-encoded at quality | PSNR against the copy (dB) | mean abs. difference (0-255) "
          "| images unchanged |")  # fmt: skip
    print("|---|---|---|---|")
    for quality in (int(q) for q in args.qualities.split(",")):
        again = sources.jpeg_roundtrip(copy, quality)
        diff = again.astype(np.float64) - copy
        psnr = 10 * np.log10(255.0**2 / np.mean(diff**2))
        unchanged = np.all(again == copy, axis=(1, 2, 3)).mean()
        print(f"| {quality} | {psnr:.2f} | {np.abs(diff).mean():.2f} | {100 * unchanged:.1f} % |")


if __name__ == "__main__":
    main()
