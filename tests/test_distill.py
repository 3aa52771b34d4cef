"""Loss, score and taps against hand computations (shared/docs/method.md)."""
import math

import pytest
import torch

from distill import anomaly_score, distillation_loss, vgg_taps, vit_taps


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
