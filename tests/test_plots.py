"""evaluate.py --plots and --table draw PNGs of the expected size; without matplotlib they say how to get it."""
import sys

import pytest
from PIL import Image

import evaluate
import train
from helpers import image_folder, vgg16_file, vit_teacher_file
from plots import DPI, FIGSIZE


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("plots")
    data = image_folder(d / "data")
    teachers = {"vit": vit_teacher_file(d / "vit.safetensors"), "vgg": vgg16_file(d / "vgg.safetensors")}
    out = {}
    for backbone, teacher in teachers.items():
        out[backbone] = d / backbone
        assert train.main(["--backbone", backbone, "--cls", "cow", "--teacher", teacher, "--data-dir", data,
                           "--image-size", "32", "--epochs", "2", "--out", str(out[backbone])]) == 0
    return out


def check_png(path, name):
    assert path.is_file() and path.stat().st_size > 1000, path
    with Image.open(path) as im:
        im.load()  # decodes the whole image
        w, h = FIGSIZE[name]
        assert im.size == (round(w * DPI), round(h * DPI)), (path, im.size)


@pytest.mark.parametrize("backbone, maps", [("vit", "mismatch"), ("vgg", "mismatch"), ("vgg", "gradient")])
def test_run_plots(runs, backbone, maps):
    pytest.importorskip("matplotlib")
    run = runs[backbone]
    assert evaluate.main([str(run), "--plots", "--maps", maps]) == 0
    for name in ("roc", "scores", "maps", "training"):
        check_png(run / f"{name}.png", name)


def test_table_chart(runs, tmp_path):
    pytest.importorskip("matplotlib")
    assert evaluate.main(["--table", str(runs["vit"]), "--table-out", str(tmp_path / "t")]) == 0
    check_png(tmp_path / "t.png", "table")


def test_without_matplotlib(runs, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert evaluate.main([str(runs["vit"]), "--plots"]) == 2
    assert "pip install matplotlib" in capsys.readouterr().err.strip().splitlines()[-1]
    assert evaluate.main([str(runs["vit"])]) == 0  # everything else works
    assert evaluate.main(["--table", str(runs["vit"]), "--table-out", str(tmp_path / "t")]) == 0
    assert "no bar chart" in capsys.readouterr().out and (tmp_path / "t.md").is_file()
