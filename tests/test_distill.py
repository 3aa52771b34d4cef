"""Loss, score and taps against hand computations (the formulas of distill.py's docstring)."""
import math

import pytest
import torch

from distill import anomaly_map, anomaly_score, distillation_loss, location_scores, vgg_taps, vit_taps


def pair_layers():
    # layer 1, (B=2, C=2, H=1, W=1): image 0 orthogonal, image 1 identical
    s1 = torch.tensor([[1.0, 0.0], [3.0, 4.0]]).view(2, 2, 1, 1)
    t1 = torch.tensor([[0.0, 2.0], [3.0, 4.0]]).view(2, 2, 1, 1)
    # layer 2, (B=2, tokens=1, D=3): image 0 opposite, image 1 parallel but twice as long
    s2 = torch.tensor([[1.0, 1.0, 1.0], [1.0, 2.0, 2.0]]).view(2, 1, 3)
    t2 = torch.tensor([[-1.0, -1.0, -1.0], [2.0, 4.0, 4.0]]).view(2, 1, 3)
    return [s1, s2], [t1, t2]


def test_score_by_hand():
    s, t = pair_layers()
    lam = 0.5
    # image 0: layer 1: 1 - cos = 1, mse = (1 + 4) / 2; layer 2: 1 - cos = 2, mse = (4 + 4 + 4) / 3
    # image 1: layer 1: 0 and 0;                        layer 2: 1 - cos = 0, mse = (1 + 4 + 4) / 3
    expected = torch.tensor([1 + lam * 2.5 + 2 + lam * 4, 0 + 0 + 0 + lam * 3])
    torch.testing.assert_close(anomaly_score(s, t, lam), expected)


def test_loss_is_the_batch_mean_of_the_score_and_matches_the_formula():
    s, t = pair_layers()
    lam = 0.01
    # L = sum_l [mean_batch(1 - cos) + lam * mean_all((s - t)^2)]
    by_formula = (1 + 0) / 2 + lam * (5 / 4) + (2 + 0) / 2 + lam * (12 + 9) / 6
    assert distillation_loss(s, t, lam).item() == pytest.approx(by_formula, rel=1e-6)


def test_identical_features_give_zero():
    torch.manual_seed(0)
    feats = [torch.randn(4, 8, 5, 5), torch.randn(4, 17, 32)]
    assert torch.allclose(anomaly_score(feats, [f.clone() for f in feats]), torch.zeros(4), atol=1e-6)
    assert abs(distillation_loss(feats, feats).item()) < 1e-6


def test_score_is_float32_for_bf16_features():
    s, t = pair_layers()
    score = anomaly_score([x.bfloat16() for x in s], [x.bfloat16() for x in t])
    assert score.dtype == torch.float32


def test_loss_needs_paired_lists():
    s, t = pair_layers()
    with pytest.raises(ValueError):
        anomaly_score(s, t[:1])


def test_taps():
    vgg = vgg_taps()  # VGG.forward()[k - 1] = max-pool k: pools 2-5 for training, 3-5 for the score
    assert vgg.train_student == vgg.train_teacher == (1, 2, 3, 4)
    assert vgg.score_student == vgg.score_teacher == (2, 3, 4)
    vit = vit_taps(12)  # student blocks 1-4 against teacher hidden states 3, 6, 9, 12
    assert (vit.train_student, vit.train_teacher) == ((1, 2, 3, 4), (3, 6, 9, 12))
    assert (vit.score_student, vit.score_teacher) == ((2, 3, 4), (6, 9, 12))
    for depth in (4, 6, 8, 24):  # other teachers: evenly spaced, last block included
        taps = vit_taps(depth).train_teacher
        assert taps[-1] == depth and list(taps) == sorted(taps) and taps[0] >= 1
        assert max(taps[i + 1] - taps[i] for i in range(3)) - min(taps[i + 1] - taps[i] for i in range(3)) <= 1
    assert math.isclose(vit_taps(24).train_teacher[0], 6)


## Anomaly maps: the score's formula at each location.

def test_location_scores_by_hand():
    # one image, a 1x2 conv map of 2 channels: location 0 orthogonal, location 1 identical
    s = torch.tensor([[1.0, 3.0], [0.0, 4.0]]).view(1, 2, 1, 2)  # (B, C, H, W): s_0 = (1, 0), s_1 = (3, 4)
    t = torch.tensor([[0.0, 3.0], [2.0, 4.0]]).view(1, 2, 1, 2)  # t_0 = (0, 2), t_1 = (3, 4)
    lam = 0.5
    # location 0: 1 - cos = 1, mean((s - t)^2) = (1 + 4) / 2; location 1: 0 and 0
    torch.testing.assert_close(location_scores(s, t, lam), torch.tensor([[1 + lam * 2.5, 0.0]]))
    tokens_s, tokens_t = s.flatten(2).transpose(1, 2), t.flatten(2).transpose(1, 2)  # the same as ViT tokens
    torch.testing.assert_close(location_scores(tokens_s, tokens_t, lam), location_scores(s, t, lam))


@pytest.mark.parametrize("size", [32, 64])
def test_conv_map_shape_and_values(size):
    torch.manual_seed(0)
    s = [torch.randn(3, 8, 8, 8), torch.randn(3, 16, 4, 4), torch.randn(3, 16, 2, 2)]  # like pools 3-5 at 64 px
    t = [x + torch.randn_like(x) for x in s]
    m = anomaly_map(s, t, size, lam=0.01)
    assert m.shape == (3, size, size) and (m >= 0).all()
    assert torch.allclose(anomaly_map(s, s, size), torch.zeros(3, size, size), atol=1e-6)  # perfect imitation: 0
    # with one tap at the image's own resolution the map is that tap's location scores, untouched
    one = anomaly_map(s[:1], t[:1], 8, lam=0.01)
    torch.testing.assert_close(one.flatten(1), location_scores(s[0], t[0], lam=0.01))


@pytest.mark.parametrize("prefix", [1, 5])
def test_vit_map_leaves_out_global_tokens_and_finds_the_wrong_patch(prefix):
    torch.manual_seed(1)
    s = [torch.randn(2, prefix + 16, 24) for _ in range(3)]  # (B, CLS + registers + 4x4 patches, D)
    t = [x.clone() for x in s]
    for x in t:
        x[:, :prefix] = -x[:, :prefix]  # the global tokens disagree completely: they are no place in the image
    assert torch.allclose(anomaly_map(s, t, 32, prefix=prefix), torch.zeros(2, 32, 32), atol=1e-6)
    for x in t:
        x[:, prefix + 5] *= -3  # patch 5 = row 1, column 1 of the 4x4 grid
    hot = anomaly_map(s, t, 32, prefix=prefix)[0]
    assert hot[8:16, 8:16].mean() > 5 * hot[24:, 24:].abs().mean()


def test_kdad_maps_on_real_networks():
    from distill import KDAD, make_student, taps_for
    from vgg import VGG
    from vit import ViT, ViTConfig
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    for backbone, teacher in (("vit", ViT(ViTConfig(image_size=32, patch_size=8, width=64, depth=4, heads=1,
                                                    mlp_width=64, registers=2)).eval()), ("vgg", VGG().eval())):
        kdad = KDAD(teacher, make_student(backbone, teacher).eval(), taps_for(backbone, teacher))
        m = kdad.map(x, "mismatch")
        assert m.shape == (2, 32, 32) and (m >= 0).all() and m.std() > 0
        g = kdad.map(x, "gradient")  # the paper's: scaled per image to [0, 1] before smoothing
        assert g.shape == (2, 32, 32) and (g >= 0).all() and (g <= 1 + 1e-6).all() and g.sum() > 0
