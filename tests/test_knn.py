"""The teacher-alone kNN baseline: its score against a brute-force computation, its features, and its place in
results.json, the printed line and the table."""
import json
import math

import pytest
import torch

import evaluate
import knn
import tables
import train
from helpers import image_folder, vgg16_file, vit_teacher_file
from knn import image_embedding, knn_scores
from vgg import VGG
from vit import ViT, ViTConfig


def brute_force_knn(bank, queries, k):
    """Mean of the k smallest cosine distances, one pair at a time, in float64 Python."""
    out = []
    for q in queries.tolist():
        distances = []
        for b in bank.tolist():
            dot = sum(x * y for x, y in zip(q, b, strict=True))
            norms = math.sqrt(sum(x * x for x in q)) * math.sqrt(sum(y * y for y in b))
            distances.append(1 - dot / norms)
        out.append(sum(sorted(distances)[:k]) / k)
    return torch.tensor(out)


@pytest.mark.parametrize("k", [1, 2, 5])
def test_knn_scores_match_brute_force(k):
    g = torch.Generator().manual_seed(k)
    bank, queries = torch.randn(12, 6, generator=g), torch.randn(9, 6, generator=g)
    torch.testing.assert_close(knn_scores(bank, queries, k, chunk=4), brute_force_knn(bank, queries, k).float(),
                               rtol=1e-5, atol=1e-6)


def test_knn_scores_of_training_images_and_bad_k():
    bank = torch.randn(5, 3)
    assert torch.allclose(knn_scores(bank, bank * 3.0, 1), torch.zeros(5), atol=1e-6)  # itself, at cosine 1
    with pytest.raises(ValueError, match="need at least 6 training images; there are 5"):
        knn_scores(bank, bank, 6)


def test_image_embedding_is_the_normalised_cls_token_or_pooled_pool5():
    torch.manual_seed(0)
    vit = ViT(ViTConfig(image_size=32, patch_size=8, width=64, depth=2, heads=2, mlp_width=64)).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        hidden = vit(x)
        torch.testing.assert_close(image_embedding(vit, hidden[-1]), vit.norm(hidden[-1][:, 0]))
        vgg = VGG().eval()
        pool5 = vgg(x)[-1]
        torch.testing.assert_close(image_embedding(vgg, pool5), pool5.mean(dim=(2, 3)))
    assert image_embedding(vgg, pool5).shape == (3, 512)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("files")
    return {"data": image_folder(d / "data"), "vit": vit_teacher_file(d / "vit.safetensors"),
            "vgg": vgg16_file(d / "vgg.safetensors")}


def run(files, out, backbone, *extra):
    """Pinned to the CPU: cached and recomputed teacher features are bitwise equal there (test below)."""
    return train.main(["--backbone", backbone, "--cls", "bee", "--teacher", files[backbone], "--data-dir",
                       files["data"], "--image-size", "32", "--epochs", "1", "--batch-size", "16", "--device", "cpu",
                       "--out", str(out), *extra])


@pytest.mark.parametrize("backbone", ["vit", "vgg"])
def test_results_printed_line_and_table_carry_the_baseline(files, tmp_path, capsys, backbone):
    out = tmp_path / "r"
    assert run(files, out, backbone) == 0
    results = json.loads((out / "results.json").read_text())
    for key in ("knn_val_auroc", "knn_test_auroc", "knn_seconds"):
        assert results[key] is not None, key
    assert results["knn_k"] == 2 and 0 <= results["knn_test_auroc"] <= 1 and results["knn_seconds"] >= 0
    printed = capsys.readouterr().out
    assert f"(teacher kNN alone {results['knn_test_auroc']:.4f})" in printed
    again = evaluate.evaluate_run(out, torch.device("cpu"))
    assert again["knn_test_auroc"] == pytest.approx(results["knn_test_auroc"], abs=1e-6)
    (group,) = tables.tables([out])
    assert "teacher kNN alone (%)" in group["markdown"]
    assert group["rows"][0]["knn_test_auroc"] == pytest.approx(100 * results["knn_test_auroc"])


def test_vgg_cache_and_teacher_pass_give_the_same_baseline(files, tmp_path):
    assert run(files, tmp_path / "cached", "vgg", "--precision", "fp32") == 0
    assert run(files, tmp_path / "pass", "vgg", "--precision", "fp32", "--no-cache") == 0
    a, b = (json.loads((tmp_path / p / "results.json").read_text()) for p in ("cached", "pass"))
    assert a["knn_test_auroc"] == pytest.approx(b["knn_test_auroc"], abs=1e-9)
    assert a["knn_val_auroc"] == pytest.approx(b["knn_val_auroc"], abs=1e-9)


def test_knn_k_zero_skips_it_and_too_large_k_is_refused(files, tmp_path, capsys):
    assert run(files, tmp_path / "r", "vit", "--knn-k", "0") == 0
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    assert not any(k.startswith("knn") for k in results)
    assert "teacher kNN" not in capsys.readouterr().out
    (group,) = tables.tables([tmp_path / "r"])
    assert group["rows"][0]["knn_test_auroc"] is None
    assert run(files, tmp_path / "r2", "vit", "--knn-k", "28") == 2  # 27 training images
    assert "--knn-k 28 needs at least 28 training images" in capsys.readouterr().err


def test_a_timm_fc_norm_checkpoint_is_said_to_give_the_raw_cls_token(files, tmp_path):
    """timm ViTs pooled by averaging (global_pool='avg', fc_norm=True: MAE, BEiT fine-tunes) keep their last
    LayerNorm as fc_norm after the pooling, and none on the tokens: the kNN feature is then the raw CLS token, and
    results.json says so."""
    timm = pytest.importorskip("timm")
    from helpers import randomize, save
    from vit import load_vit
    kw = dict(img_size=32, patch_size=8, embed_dim=128, depth=2, num_heads=2, mlp_ratio=2)
    avg = randomize(timm.models.vision_transformer.VisionTransformer(global_pool="avg", fc_norm=True, **kw))
    assert "fc_norm.weight" in avg.state_dict() and "norm.weight" not in avg.state_dict()
    path = save(avg.state_dict(), tmp_path / "mae-like.safetensors")
    teacher = load_vit(path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        last = teacher(x)[-1]
    assert teacher.norm is None and torch.equal(image_embedding(teacher, last), last[:, 0])
    token = save(randomize(timm.models.vision_transformer.VisionTransformer(**kw)).state_dict(),
                 tmp_path / "token.safetensors")  # the usual CLS-token ViT: its final norm is there
    assert knn.feature_name("vit", load_vit(token)) == "final normalised CLS token"
    out = tmp_path / "r"
    assert train.main(["--backbone", "vit", "--cls", "bee", "--teacher", path, "--data-dir", files["data"],
                       "--image-size", "32", "--epochs", "1", "--batch-size", "16", "--out", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["knn_feature"] == "raw CLS token"
