"""The per-class tables: finished runs grouped by what makes them comparable, mean +- std over seeds within a group,
beside the published figures of the same data set and backbone (saying what differs from their setup). Written as
Markdown, CSV and (with matplotlib) a bar chart.

    python evaluate.py --table runs/vit-*-all-s0 runs/vit-*-all-s1

Plumbing beside evaluate.py: nothing here computes a score.
"""
import csv
import io
import sys
from pathlib import Path

import numpy as np

from cli import RunError
from data import CIFAR10_CLASSES, CROP_PCT
from mvtec import MVTEC_CATEGORIES
from plots import PlotError, table_png
from record import DESCRIBED, RESULT_SETTINGS, TORCHVISION_CIFAR10, read_json, read_run_config, run_folders, write_text
from writes import write_atomically

# Published per-class figures (%): {(dataset, backbone): (source, {class: image AUROC}, {class: pixel AUROC})}.
# One-class CIFAR-10: the paper's table (VGG16) and the ViT reproduction's README
# (LucStrater/Knowledge_Distillation_AD).
# MVTec AD: the paper's detection and localisation AUROC per category, as the PaddlePaddle reproduction's README
# quotes them (txyugood/Knowledge_Distillation_AD_Paddle, "Origin" row): the paper's own table was not at hand to
# check them against. Its localisation is gradient maps at 128 px, scored on the defective test images only.
PUBLISHED = {
    ("cifar10", "vgg"): ("Salehi et al. 2021, KDAD paper (VGG16)", dict(zip(CIFAR10_CLASSES, [
        90.53, 90.35, 79.66, 77.02, 86.71, 91.40, 88.98, 86.78, 91.45, 88.91], strict=True)), {}),
    ("cifar10", "vit"): ("ViT reproduction of KDAD (teacher vit-b16-cifar10, saw CIFAR-10 labels; ImageNet mean/std "
                         "inputs; epoch picked by validation AUROC on a labelled part of the training split)",
                         dict(zip(CIFAR10_CLASSES, [
                             96.78, 98.16, 96.20, 93.55, 96.52, 94.72, 97.96, 97.71, 98.01, 98.68], strict=True)), {}),
    ("mvtec", "vgg"): ("Salehi et al. 2021, KDAD paper (VGG16), as quoted by the PaddlePaddle reproduction's README; "
                       "pixel AUROC there is on defective images only", dict(zip(MVTEC_CATEGORIES, [
                           99.39, 89.19, 80.46, 79.25, 78.01, 98.37, 95.05, 73.58, 82.70, 83.31, 91.57, 92.17, 85.55,
                           94.29, 93.24], strict=True)), dict(zip(MVTEC_CATEGORIES, [
                               96.32, 82.40, 95.86, 95.64, 91.78, 94.62, 98.05, 86.38, 89.63, 95.96, 82.77, 96.12,
                               76.45, 84.80, 93.90], strict=True))),
}
MEANS = ("test_auroc", "val_auroc", "knn_test_auroc", "pixel_auroc", "pro", "pixel_auroc_mismatch", "pro_mismatch")
COLUMNS = [("test_auroc", "test AUROC (%)"), ("knn_test_auroc", "teacher kNN alone (%)"),
           ("val_auroc", "val AUROC (%)"), ("pixel_auroc", "pixel AUROC (%)"), ("pro", "PRO (%)"),
           ("pixel_auroc_mismatch", "pixel AUROC, mismatch (%)"), ("pro_mismatch", "PRO, mismatch (%)"),
           ("runs", "runs"), ("published", "published (%)"), ("published_pixel", "published pixel AUROC (%)")]


def fmt(x, digits=2, scale=100.0) -> str:
    """An AUROC for printing: 'n/a' where there is none."""
    return "n/a" if x is None else f"{x * scale:.{digits}f}"


## --------------------------------------------------------------------------------------------------------
## The per-class table: runs grouped by what makes them comparable, mean +- std over seeds within a group.

def comparable(cfg: dict) -> tuple:
    """What runs must share to be seeds of one experiment: every setting that changes a result
    (record.RESULT_SETTINGS: backbone, teacher by content, data, recipe, precision, ...) except the class and the
    seed, the number of epochs, and the teacher as described (heads, eps)."""
    s = dict(cfg["settings"])
    s["data"] = s.get("data") or (s["data_dir"] or TORCHVISION_CIFAR10)  # runs written before `data` existed
    s["teacher_sha256"] = cfg["teacher"]["sha256"]
    s.setdefault("dataset", "cifar10")
    s.setdefault("crop_pct", CROP_PCT)
    keys = [k for k in RESULT_SETTINGS if k not in ("cls", "seed")] + ["epochs"]
    described = cfg["teacher"].get("config", {})  # the same file with other heads is another network
    return tuple(repr(s.get(k)) for k in keys) + tuple(repr(described.get(k)) for k in DESCRIBED)


def describe_group(cfg: dict, short=False) -> str:
    """The group's title: backbone, teacher and data (short, for the chart), then the recipe."""
    s, t = cfg["settings"], cfg["teacher"]
    data = "CIFAR-10 (torchvision)" if not s["data_dir"] else Path(s["data_dir"]).name
    if s.get("dataset") == "mvtec":
        data = f"MVTec AD ({data})"
    teacher = t.get("short_name") or Path(t["name"]).name
    epochs = f"{s['epochs']} epoch" + "s" * (s["epochs"] != 1)
    limit = f", limit {s['limit']}" if s["limit"] else ""  # not the protocol's test set: say so in every title
    precision = f", {s['precision']}" if s.get("precision") else ""  # runs in another precision: another group
    if short:
        return f"KDAD, {s['backbone']}, teacher {teacher}, data {data}, {s['image_size']} px, {epochs}{limit}" \
               f"{precision}"
    return (f"{s['backbone']}, teacher {teacher}, data {data}, {epochs}, batch {s['batch_size']}, "
            f"lr {s['lr']:g}, lambda {s['lam']:g}, {s['image_size']} px{limit}"
            + precision + (", plain" if s.get("plain") else "")
            + (", selected by val AUROC" if s["select"] == "val-auroc" else ""))


def on_cifar10(cfg: dict) -> bool:
    data = cfg.get("data")
    return data["cifar10"] if data else not cfg["settings"]["data_dir"]  # older runs: torchvision means CIFAR-10


def published_for(cfg: dict) -> tuple[str | None, dict, dict]:
    """(source, {class: image AUROC}, {class: pixel AUROC}) of the published figures comparable with this group:
    CIFAR-10 runs (torchvision's, or a folder of exactly its classes) and MVTec AD runs on their whole test sets (no
    --limit), matched by class name."""
    s = cfg["settings"]
    dataset = s.get("dataset", "cifar10")
    if (dataset == "cifar10" and not on_cifar10(cfg)) or s.get("limit"):  # --limit: not the protocol's test set
        return None, {}, {}
    return PUBLISHED.get((dataset, s["backbone"]), (None, {}, {}))


def unlike_published(cfg: dict) -> list[str]:
    """How this group's setup differs from the one the published figures came from (the recipe with its teacher),
    e.g. ['epochs 1 (published: 200)', 'teacher dino (published: vgg16)']; empty where it is that setup."""
    from hub import DEFAULT_TEACHER  # here, not at the top: reading tables needs neither
    from train import RECIPES
    s, t = cfg["settings"], cfg["teacher"]
    dataset = s.get("dataset", "cifar10")
    recipe = RECIPES[dataset][s["backbone"]]
    differ = [f"{what} {s[k]:g} (published: {recipe[k]:g})" for k, what in (
        ("epochs", "epochs"), ("image_size", "image size"), ("batch_size", "batch"), ("lr", "lr"), ("lam", "lambda"))
        if s.get(k) != recipe[k]]
    want = DEFAULT_TEACHER[dataset][s["backbone"]]
    if t.get("preset") != want:
        differ.append(f"teacher {t.get('short_name') or Path(t['name']).name} (published: {want})")
    return differ


def group_rows(runs: list[tuple[dict, dict]]) -> tuple[list[dict], str | None]:
    """Rows of one group's table from (config, results) pairs: one per class (figures in %, the mean over its
    runs, the test AUROC's std over them), then the mean over classes; and the published figures' source."""
    by_class = {}
    for _, r in runs:
        by_class.setdefault((r["cls"], r["class_name"]), []).append(r)
    source, published, published_pixel = published_for(runs[0][0])
    rows = []
    for (cls, name), rs in sorted(by_class.items()):
        row = {"class": cls, "name": name, "runs": len(rs), "published": published.get(name),
               "published_pixel": published_pixel.get(name)}
        for key in MEANS:  # a figure some runs lack (older runs, --knn-k 0, no anomalous validation) is n/a
            values = [r[key] for r in rs if r.get(key) is not None]
            row[key] = 100 * float(np.mean(values)) if values and len(values) == len(rs) else None
        aucs = np.array([r["test_auroc"] for r in rs]) * 100
        row["std"] = float(aucs.std(ddof=1)) if len(aucs) > 1 else None
        rows.append(row)
    mean = {"class": "mean", "name": "", "runs": sum(r["runs"] for r in rows), "std": None}
    for key in MEANS + ("published", "published_pixel"):
        values = [r[key] for r in rows]
        mean[key] = float(np.mean(values)) if values and all(v is not None for v in values) else None
    for key in ("published", "published_pixel"):  # a published mean is over all the paper's classes, or none
        if len(rows) != len(published):
            mean[key] = None
    return rows + [mean], source if any(r["published"] is not None for r in rows) else None


def markdown(rows: list[dict]) -> str:
    """The rows as a Markdown table; columns no row has a value for are left out."""
    shown = [(k, t) for k, t in COLUMNS if k in ("test_auroc", "runs") or any(r.get(k) is not None for r in rows)]
    lines = ["| class | name | " + " | ".join(t for _, t in shown) + " |", "|---|---|" + "---|" * len(shown)]
    for r in rows:
        cells = []
        for key, _ in shown:
            if key == "runs":
                cells.append(str(r["runs"]))
            elif key == "test_auroc" and r["std"] is not None:
                cells.append(f"{fmt(r[key], scale=1)} ± {r['std']:.2f}")
            elif key.startswith("published"):
                cells.append(fmt(r[key], scale=1) if r[key] is not None else "")
            else:
                cells.append(fmt(r[key], scale=1))
        lines.append(f"| {r['class']} | {r['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tables(paths, records=()) -> list[dict]:
    """One table per group of comparable runs among the finished runs in `paths` (see record.run_folders) and
    `records`, (config, results, name) of runs whose folders are elsewhere (other machines under torchrun): each
    {"title", "rows", "markdown", "published_label"}. Unfinished runs are named on stderr and left out."""
    groups = {}
    for cfg, results, name in records:
        groups.setdefault(comparable(cfg), []).append((cfg, results, name))
    for run in run_folders(paths) if paths else []:
        if not (run / "results.json").is_file():
            print(f"note: {run} is unfinished (no results.json): left out of the table", file=sys.stderr)
            continue
        cfg = read_run_config(run)
        groups.setdefault(comparable(cfg), []).append((cfg, read_json(run / "results.json"), run))
    if not groups:
        raise RunError(f"no finished run in {', '.join(map(str, paths)) or 'these jobs'} (no results.json): nothing "
                       f"to tabulate")
    out = []
    for runs in groups.values():
        seen, kept = {}, []
        for cfg, r, run in runs:  # a seed counted twice would shrink the std and inflate the count of runs
            first = seen.setdefault((r["cls"], r.get("seed")), run)
            if first == run:
                kept.append((cfg, r))
            else:
                print(f"note: left out {run}: the same run as {first} (class {r['class_name']}, seed "
                      f"{r.get('seed')}, the same settings), counted once", file=sys.stderr)
        runs = kept
        rows, label = group_rows(runs)
        title = describe_group(runs[0][0])
        published = f"\n\npublished: {label}" if label else ""
        differ = unlike_published(runs[0][0]) if label else []
        if differ:  # a reference, not a figure this setup should reach
            published += f"\n\nthe published figures come from another setup than this table's: {', '.join(differ)}"
        out.append({"title": title, "chart_title": describe_group(runs[0][0], short=True), "rows": rows,
                    "published_label": label, "unlike_published": differ,
                    "markdown": f"### {title}\n\n{markdown(rows)}{published}"})
    return out


def table_prefix(paths) -> Path:
    """Where a table goes by default: inside the one folder of runs given (a --cls all folder), else in the
    runs' common parent folder."""
    runs = [Path(p).resolve() for p in paths]
    if len(runs) == 1 and not (runs[0] / "config.json").is_file():
        return runs[0] / "table"
    parents = [r.parent for r in runs]
    common = Path(*[parts[0] for parts in zip(*(p.parts for p in parents), strict=False) if len(set(parts)) == 1])
    return common / "table"


def write_table(paths, out_prefix=None, records=()) -> str:
    """Write the tables of the runs in `paths` and `records` (see tables) as one .md and one .csv (and, with
    matplotlib, one bar chart per group) at out_prefix (default: table_prefix); returns the text to print, the
    paths written included."""
    groups = tables(paths, records)
    out = Path(out_prefix) if out_prefix else table_prefix(paths)
    out.parent.mkdir(parents=True, exist_ok=True)
    written = [out.with_suffix(".md"), out.with_suffix(".csv")]
    write_text(out.with_suffix(".md"), "\n\n".join(g["markdown"] for g in groups) + "\n")
    rows = io.StringIO()
    order = ["class", "name", "test_auroc", "std"] + [k for k, _ in COLUMNS if k != "test_auroc"]
    writer = csv.DictWriter(rows, fieldnames=["group", *order])
    writer.writeheader()
    for g in groups:
        writer.writerows({"group": g["title"]} | r for r in g["rows"])
    write_atomically(out.with_suffix(".csv"), lambda tmp: tmp.write_text(rows.getvalue(), newline=""))
    for stale in [out.with_suffix(".png"), *out.parent.glob(f"{out.name}-[0-9]*.png")]:  # an earlier table's charts
        stale.unlink(missing_ok=True)
    for k, g in enumerate(groups, start=1):
        png = out.with_suffix(".png") if len(groups) == 1 else out.with_name(f"{out.name}-{k}.png")
        try:
            other = " (another setup: see table.md)" if g["unlike_published"] else ""
            table_png(png, g["rows"], g["chart_title"], f"published{other}: {g['published_label'] or 'none'}")
            written.append(png)
        except PlotError as e:
            print(f"note: no bar chart ({e})")
            break
    return "\n\n".join(g["markdown"] for g in groups) + "\n\nwrote " + ", ".join(map(str, written))
