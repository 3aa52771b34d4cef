"""bench.py runs and prints its tables (no figure is checked: speeds depend on the machine)."""
import re

import bench


def test_table_projection_prints_one_row_per_recipe(capsys):
    bench.main(["--table", "--device", "cpu", "--image-size", "32", "--steps", "1", "--batch-size", "2",
                "--processes", "1", "3"])
    out = capsys.readouterr().out
    assert "| recipe | train img/s | score img/s | one class, min | ten classes: 1 process | 3 processes |" in out
    for recipe in ("vit (10 epochs, batch 128)", "vgg (200 epochs, batch 64)"):
        row = next(line for line in out.splitlines() if line.startswith(f"| {recipe} |"))
        ten_by_one, ten_by_three = (float(x) for x in re.findall(r"([\d.]+) min \|", row))
        assert ten_by_one >= ten_by_three  # 10 classes on 3 processes: 4 classes' time


def test_fast_against_plain(capsys):
    bench.main(["--device", "cpu", "--image-size", "32", "--steps", "1", "--batch-size", "2", "--workers", "0",
                "--backbones", "vgg"])
    out = capsys.readouterr().out
    assert "| vgg | train img/s (cache warm) |" in out and "| vgg | score img/s |" in out
