"""evaluate.py --plots and --table draw PNGs of the expected size; without matplotlib they say how to get it."""
import sys

import numpy as np
import pytest
from PIL import Image

import evaluate
import plots
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
def test_run_plots(runs, backbone, maps, drawn, capsys):
    run = runs[backbone]
    assert evaluate.main([str(run), "--plots", "--maps", maps]) == 0
    for name in ("roc", "scores", f"maps-{maps}", "training"):  # each kind of map in its own file
        check_png(run / f"{name}.png", name.split("-")[0])
    assert not (run / "maps.png").exists()
    assert f"wrote roc.png, scores.png, maps-{maps}.png, training.png in {run}" in capsys.readouterr().out
    assert len(drawn) == 4
    for fig in drawn:
        assert_texts_inside(fig)
    # maps.png says which colour is high and what a map value means, in a colour bar
    (bar,) = [ax for ax in drawn[2].axes if ax.get_label() == "<colorbar>"]
    assert bar.get_ylabel() == plots.MAP_LABELS[maps]
    assert "dark = low, bright = high" in drawn[2].get_suptitle()


def test_table_chart(runs, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert evaluate.main(["--table", str(runs["vit"]), "--table-out", str(tmp_path / "t")]) == 0
    check_png(tmp_path / "t.png", "table")
    printed = capsys.readouterr().out
    assert printed.count("wrote ") == 1 and printed.count(str(tmp_path / "t.png")) == 1  # each file said once


def test_without_matplotlib(runs, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(SystemExit) as stop:  # at once, with the flags (test_cli: before torch is imported)
        evaluate.main([str(runs["vit"]), "--plots"])
    assert stop.value.code == 2
    assert "pip install matplotlib" in capsys.readouterr().err.strip().splitlines()[-1]
    assert evaluate.main([str(runs["vit"])]) == 0  # everything else works
    assert evaluate.main(["--table", str(runs["vit"]), "--table-out", str(tmp_path / "t")]) == 0
    assert "no bar chart" in capsys.readouterr().out and (tmp_path / "t.md").is_file()


## --------------------------------------------------------------------------------------------------------
## What each figure shows: read back from the matplotlib figure before it is saved.

LONG_TEACHER = "a-rather-long-teacher-file-name-dinov2-vitb14-reg4-lvd142m-finetuned-in1k-518px.safetensors"


@pytest.fixture
def drawn(monkeypatch):
    """Figures that plots.save is given: written as save writes them, but kept open (and so measurable) until the
    test ends."""
    plt = pytest.importorskip("matplotlib.pyplot")
    figs = []

    def keep(fig, path):
        fig.savefig(path, dpi=DPI)  # as plots.save, less the close
        figs.append(fig)
    monkeypatch.setattr(plots, "save", keep)
    yield figs
    for fig in figs:
        plt.close(fig)


def assert_texts_inside(fig):
    """Nothing drawn (title, labels, tick labels, legend, colour bar) is cut off at the figure's edge: the tight
    box around all of it lies within the figure. `fig` was saved (the `drawn` fixture's figures are), so it is laid
    out; measuring it needs no second drawing, which is what takes the time."""
    box = fig.get_tightbbox(fig.canvas.get_renderer())  # inches, as laid out when saved (no second drawing)
    w, h = fig.get_size_inches()
    tol = 1 / DPI
    assert box.x0 >= -tol and box.y0 >= -tol and box.x1 <= w + tol and box.y1 <= h + tol, (box, (w, h))


def overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def run_cfg(teacher_name, preset=None, leak=False):
    return {"settings": {"backbone": "vit", "cls": 3, "class_name": "cat"},
            "teacher": {"name": teacher_name, "preset": preset, "label_leak": leak}}


def test_teacher_label_and_run_title():
    assert plots.teacher_label({"name": "/x/y/my.teacher.safetensors"}) == "my.teacher"
    assert plots.teacher_label({"name": "https://h/org/repo/resolve/main/model.safetensors?download=1"}) == "model"
    assert plots.teacher_label(run_cfg("vit-b16-cifar10", "vit-b16-cifar10", True)["teacher"]) == \
        "vit-b16-cifar10 (saw CIFAR-10 labels)"
    assert plots.run_title(run_cfg("dino-vitb16", "dino-vitb16")) == \
        "vit student, teacher dino-vitb16, normal class 3 (cat)"


@pytest.mark.parametrize("name", ["roc", "scores", "training"])
def test_long_titles_fit(drawn, tmp_path, name):
    """A long teacher name is wrapped onto more lines, never cut off at the right edge."""
    title = f"test {name}: " + plots.run_title(run_cfg(LONG_TEACHER))
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(20, int), np.ones(40, int)]
    scores = rng.normal(size=60) + labels
    if name == "roc":
        plots.roc_png(tmp_path / "f.png", scores, labels, 0.75, title)
    elif name == "scores":
        plots.scores_png(tmp_path / "f.png", scores, labels, title)
    else:
        plots.training_png(tmp_path / "f.png", [{"epoch": e, "loss": 1 / e, "val_normal_loss": 1.1 / e}
                                                for e in (1, 2, 3)], title)
    fig = drawn[-1]
    assert fig.axes[0].get_title().count("\n") >= 1
    assert_texts_inside(fig)
    check_png(tmp_path / "f.png", name)


def test_training_curve_of_one_epoch(drawn, tmp_path):
    """One epoch is a point at epoch 1 on an axis of whole epochs, not an axis from 0.96 to 1.04; its two points
    carry their values, and neither lies under the legend or on the axes' edge."""
    plots.training_png(tmp_path / "t.png", [{"epoch": 1, "loss": 5.42, "val_normal_loss": 5.34}], "one epoch")
    fig = drawn[-1]
    ax = fig.axes[0]
    lo, hi = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
    assert hi - lo >= 1 and ticks == [1]
    assert sorted(t.get_text() for t in ax.texts) == ["5.3400", "5.4200"]
    fig.canvas.draw()
    (legend,) = fig.legends + [ax.get_legend()] * (ax.get_legend() is not None)
    box, axes_box = legend.get_window_extent(), ax.get_window_extent()
    for line in ax.get_lines():
        x, y = ax.transData.transform((line.get_xdata()[0], line.get_ydata()[0]))
        assert not (box.x0 <= x <= box.x1 and box.y0 <= y <= box.y1), "a point under the legend"
        assert axes_box.y0 + 0.05 * axes_box.height < y < axes_box.y1 - 0.05 * axes_box.height, "a point on the edge"
    assert_texts_inside(fig)


def test_titles_wrap_between_phrases():
    title = "test scores: vit student, teacher dinov2-focus, normal class 8 (ship)"  # 69 characters: two lines
    assert plots.wrap(title, FIGSIZE["scores"][0]) == "test scores: vit student, teacher dinov2-focus,\n" \
                                                      "normal class 8 (ship)"
    for teacher in ("dino-vitb16", "vit-b16-cifar10 (saw CIFAR-10 labels)", LONG_TEACHER):
        text = f"training: vit student, teacher {teacher}, normal class 3 (cat)"
        lines = plots.wrap(text, FIGSIZE["training"][0]).splitlines()
        assert lines[-1].endswith("normal class 3 (cat)") and not any(line.endswith("normal") for line in lines)
        assert "".join(lines).replace(" ", "") == text.replace(" ", "")  # nothing lost


def bar_chart_rows(names, values, knn=None, published=None, std=None):
    rows = [{"class": i, "name": n, "test_auroc": v, "std": std and std[i], "published": published and published[i],
             "knn_test_auroc": knn and knn[i]} for i, (n, v) in enumerate(zip(names, values, strict=True))]
    return rows + [{"class": "mean", "name": "", "test_auroc": float(np.mean(values)), "std": None,
                    "published": None, "knn_test_auroc": None}]


CLASS_SETS = {
    2: (["good_widgets", "a-class-with-a-rather-long-folder-name-that-goes-on-and-on"], [34.7, 88.3]),
    10: (["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
         [35.9, 39.6, 61.2, 55.0, 72.3, 48.1, 80.4, 93.2, 95.5, 99.0]),
    15: (["bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill", "screw", "tile",
          "toothbrush", "transistor", "wood", "zipper"], list(np.linspace(30, 99, 15))),
}


@pytest.mark.parametrize("n", sorted(CLASS_SETS))
def test_bar_chart_layout(drawn, tmp_path, n):
    """2, 10 or 15 classes with long names: every bar visible (low ones too), the legend over none of them, the
    chance line drawn, nothing cut off, and a missing kNN value marked n/a instead of a zero bar."""
    names, values = CLASS_SETS[n]
    knn = [None] + [v - 5 for v in values[1:]]  # an old run without the baseline
    published = [90.0 + i % 9 for i in range(n)] if n == 10 else None
    std = [1.5] * n
    plots.table_png(tmp_path / "t.png", bar_chart_rows(names, values, knn, published, std),
                    "KDAD, vit, teacher " + LONG_TEACHER + ", some data", "published: Someone et al. 2021")
    check_png(tmp_path / "t.png", "table")
    fig = drawn[-1]
    ax = fig.axes[0]
    r = fig.canvas.get_renderer()
    bars = [p for c in ax.containers if hasattr(c, "patches") for p in c.patches]
    assert len(bars) == (n + 1) + (n - 1) + (n if published else 0)  # this project (+ mean), kNN, published
    axes_height = ax.get_window_extent(r).height
    for b in bars:
        assert b.get_window_extent(r).height >= 0.1 * axes_height, "a bar is a sliver"
    assert ax.get_ylim()[0] == 0  # every chart alike: a bar's length is its AUROC
    numbers = [t for t in ax.texts if t.get_text() != "n/a"]  # every bar carries its value, legibly
    assert sorted(float(t.get_text()) for t in numbers) == sorted(round(b.get_height(), 1) for b in bars)
    assert all(t.get_fontsize() >= 8 for t in ax.texts)
    assert all(t.get_rotation() == 0 for t in numbers) == (n == 2)  # across the bar where it fits
    assert any(list(line.get_ydata()) == [50, 50] for line in ax.get_lines()), "no chance line"
    (legend,) = fig.legends + [a.get_legend() for a in fig.axes if a.get_legend()]
    box = legend.get_window_extent(r)
    assert not any(overlap(box, b.get_window_extent(r)) for b in bars)
    assert not overlap(box, ax.get_window_extent(r))
    labels = [t.get_text() for t in legend.get_texts()]
    assert "published: Someone et al. 2021" in labels if published else not any("published" in t for t in labels)
    # the first class's and the mean's kNN, and the mean's published number
    assert [t.get_text() for t in ax.texts].count("n/a") == 2 + bool(published)
    assert_texts_inside(fig)


def mask_arrays(n, size=64):
    """n generated images with a dark square defect, maps high there, and their masks; the last mask empty."""
    rng = np.random.default_rng(0)
    images = np.full((n, size, size, 3), 0.6, np.float32) + rng.normal(0, 0.02, (n, size, size, 3))
    masks = np.zeros((n, size, size), bool)
    for i in range(n - 1):
        masks[i, 10 + 5 * i:30 + 5 * i, 20:40] = True
    images[masks] = 0.2
    maps = rng.normal(1.0, 0.05, (n, size, size)) + 2.0 * masks
    return images.clip(0, 1), maps, masks, [f"test/crack/{i:03d}.png (crack)" for i in range(n)]


@pytest.mark.parametrize("n", [1, 3])
def test_maps_with_masks(drawn, tmp_path, n):
    images, maps, masks, titles = mask_arrays(n)
    plots.maps_with_masks_png(tmp_path / "m.png", images, maps, masks, titles, "MVTec AD: bottle",
                              "mismatch per pixel (mean over the image = score)")
    with Image.open(tmp_path / "m.png") as im:
        w, h = plots.masks_figsize(n)
        assert im.size == (round(w * DPI), round(h * DPI))
    assert plots.masks_figsize(n)[1] > plots.masks_figsize(n - 1)[1]  # taller with each image, same width
    fig = drawn[-1]
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    colour_bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(panels) == 3 * n and len(colour_bars) == 1
    assert colour_bars[0].get_xlabel().replace("\n", " ") == "mismatch per pixel (mean over the image = score)"
    for i in range(n):
        image_ax, map_ax, mask_ax = panels[3 * i:3 * i + 3]
        outlined = bool(masks[i].any())
        assert len(image_ax.collections) == 0
        assert (len(map_ax.collections) > 0) == outlined and (len(mask_ax.collections) > 0) == outlined
        assert ("defect-free" in mask_ax.get_title()) == (not outlined)
    assert_texts_inside(fig)


def test_maps_with_masks_refuses_mismatched_arrays(tmp_path):
    images, maps, masks, titles = mask_arrays(2)
    with pytest.raises(ValueError, match="must both be"):
        plots.maps_with_masks_png(tmp_path / "m.png", images, maps[:, :32], masks, titles, "t")
    with pytest.raises(ValueError, match="bool"):
        plots.maps_with_masks_png(tmp_path / "m.png", images, maps, masks.astype(np.uint8), titles, "t")
    with pytest.raises(ValueError, match="one title per image"):
        plots.maps_with_masks_png(tmp_path / "m.png", images, maps, masks, titles[:1], "t")
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        plots.maps_with_masks_png(tmp_path / "m.png", images[..., 0], maps, masks, titles, "t")
    with pytest.raises(ValueError, match="divide by 255"):
        plots.maps_with_masks_png(tmp_path / "m.png", images * 255, maps, masks, titles, "t")
    maps[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        plots.maps_with_masks_png(tmp_path / "m.png", images, maps, masks, titles, "t")
    assert not list(tmp_path.iterdir())


def test_new_figures_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    images, maps, masks, titles = mask_arrays(2)
    for draw in (lambda: plots.maps_with_masks_png(tmp_path / "m.png", images, maps, masks, titles, "t"),
                 lambda: plots.table_png(tmp_path / "t.png", bar_chart_rows(["a", "b"], [60.0, 70.0]), "t")):
        with pytest.raises(plots.PlotError, match="pip install matplotlib"):
            draw()
    assert not list(tmp_path.iterdir())
