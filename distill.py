"""The KDAD method itself: which features are compared, the distillation loss, the anomaly score and its map.

"Multiresolution Knowledge Distillation for Anomaly Detection" (Salehi et al., CVPR 2021, arXiv 2011.11108),
section 3. A frozen teacher and a smaller student see the same image; the student is trained on normal images to
reproduce the teacher's features at several depths ("taps"). On a new image, how badly the student does that is
the anomaly score. Each tapped pair (s, t) contributes, per image,

    (1 - cos(s, t))  +  lambda * mean((s - t)^2)        "direction" loss + lambda * "value" loss

with s and t flattened over everything but the batch. Training minimises the batch mean of that sum over the
training taps; the score is the same sum, per image, over the score taps (the paper's code; see the README's recipes).
"""
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from checkpoint import CheckpointError, read_header
from vgg import CLONER, VGG, load_vgg16
from vit import ViT, load_vit, student_config

LAMBDA = 0.01  # weight of the value (MSE) term; the paper's value for CIFAR-10


## --------------------------------------------------------------------------------------------------------
## Taps: list indices into the outputs of student.forward() and teacher.forward(), paired position by position.

@dataclass(frozen=True)
class Taps:
    train_student: tuple
    train_teacher: tuple
    score_student: tuple
    score_teacher: tuple


def vgg_taps() -> Taps:
    """Pools 2-5 for training, pools 3-5 for the score. VGG.forward()[k - 1] is the output of max-pool k.

    (The paper's code hides these in the index lists [3, 6, 9, 12] and [6, 9, 12] over 13 saved activations.)"""
    def pools(*ks):
        return tuple(k - 1 for k in ks)
    return Taps(pools(2, 3, 4, 5), pools(2, 3, 4, 5), pools(3, 4, 5), pools(3, 4, 5))


def vit_taps(teacher_depth: int, student_depth: int = 4) -> Taps:
    """Student blocks 1..4 against evenly spaced teacher blocks ending at the last (3, 6, 9, 12 for a 12-block
    teacher) for training; the score drops the first pair. ViT.forward()[i] is the output of block i.

    For both backbones the last training tap of the teacher is its last output (pool5, block L): a cache of the
    training taps therefore also holds what image_embedding needs."""
    student = tuple(range(1, student_depth + 1))
    teacher = tuple(max(1, (teacher_depth * k + student_depth // 2) // student_depth) for k in student)
    return Taps(student, teacher, student[1:], teacher[1:])


def tapped(features: list, indices: tuple) -> list:
    return [features[i] for i in indices]


## --------------------------------------------------------------------------------------------------------
## Loss, score and map: one formula, written once.

def mismatch(s: torch.Tensor, t: torch.Tensor, lam: float, dim: int) -> torch.Tensor:
    """(1 - cos(s, t)) + lam * mean((s - t)^2), both taken along `dim` (the "direction" and "value" terms)."""
    direction = 1 - F.cosine_similarity(s, t, dim=dim)
    value = (s - t).pow(2).mean(dim=dim)
    return direction + lam * value


def anomaly_score(student_feats: list, teacher_feats: list, lam: float = LAMBDA) -> torch.Tensor:
    """Per-image score (B,): sum over tapped pairs of (1 - cos) + lam * mean squared difference. Higher = more
    anomalous. Computed in float32 whatever precision the features came in."""
    score = 0.0
    for s, t in zip(student_feats, teacher_feats, strict=True):
        s, t = s.float().flatten(1), t.float().flatten(1)  # (B, C*H*W) for VGG, (B, tokens*D) for ViT
        score = score + mismatch(s, t, lam, dim=1)
    return score


def distillation_loss(student_feats: list, teacher_feats: list, lam: float = LAMBDA) -> torch.Tensor:
    """L = sum_l [ mean_batch(1 - cos) + lam * mean_all((s - t)^2) ]: the batch mean of the per-image score
    (every image has the same number of elements, so the mean of per-image means is the mean over all)."""
    return anomaly_score(student_feats, teacher_feats, lam).mean()


## --------------------------------------------------------------------------------------------------------
## Anomaly maps: where in the image the student fails to imitate the teacher.
##
## The score compares whole flattened feature maps. The map applies the same formula at each location l (a position
## of a conv map, or a patch token of a ViT), to the feature vectors s_l and t_l found there:
##     m_l = (1 - cos(s_l, t_l)) + lambda * mean_C((s_l - t_l)^2)
## as student-teacher localisation does (STPM, Wang et al. 2021, arXiv 2103.04257, compares the normalised vectors
## position by position). Each score tap's map is upsampled (bilinear) to the image and the taps' maps are summed.
## Where the student imitates the teacher, m_l is near 0 whatever the size of the features there. (Splitting the
## image's score exactly into per-location shares would weigh each location by its feature magnitude instead.)

def location_scores(s: torch.Tensor, t: torch.Tensor, lam: float = LAMBDA) -> torch.Tensor:
    """(B, L) float32: the score's formula at each location; s, t are (B, C, H, W) (L = H*W, vectors of C
    channels) or (B, N, D) (L = N tokens, vectors of width D). Each value is >= 0 (0 where s_l = t_l)."""
    s, t = s.float(), t.float()
    if s.dim() == 4:
        s, t = s.flatten(2).transpose(1, 2), t.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, L, C)
    return mismatch(s, t, lam, dim=-1)                                   # (B, L)


def anomaly_map(student_feats: list, teacher_feats: list, size: int, lam: float = LAMBDA, prefix: int = 0):
    """(B, size, size) float32 map: the sum over the tapped pairs of location_scores, each upsampled to the image.
    For a ViT, the first `prefix` tokens (CLS, registers) are no place in the image and are left out."""
    total = 0.0
    for s, t in zip(student_feats, teacher_feats, strict=True):
        scores = location_scores(s, t, lam)                         # (B, L)
        if s.dim() == 4:
            h, w = s.shape[-2:]
        else:
            scores = scores[:, prefix:]                             # the patch tokens, row-major
            h = w = int(round(scores.shape[1] ** 0.5))
        grid = scores.view(-1, 1, h, w)                             # (B, 1, h, w)
        total = total + F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False)
    return total[:, 0]


## --------------------------------------------------------------------------------------------------------
## Teacher, student and taps together: what a training step and a scoring pass do with a batch of images.

class KDAD:
    def __init__(self, teacher, student, taps: Taps, lam: float = LAMBDA):
        self.teacher, self.student, self.taps, self.lam = teacher, student, taps, lam

    def teacher_features(self, x, indices: tuple) -> list:
        """The frozen teacher's features at the tapped outputs `indices`."""
        with torch.no_grad():  # the teacher is frozen: its features are targets, not part of the graph
            return tapped(self.teacher(x), indices)

    def loss(self, x, teacher_feats: list | None = None) -> torch.Tensor:
        """Training loss of a batch; teacher_feats (training taps) may come from a cache instead."""
        if teacher_feats is None:
            teacher_feats = self.teacher_features(x, self.taps.train_teacher)
        return distillation_loss(tapped(self.student(x), self.taps.train_student), teacher_feats, self.lam)

    def score(self, x, train_taps: bool = False, teacher_feats: list | None = None) -> torch.Tensor:
        """Per-image anomaly score (B,) float32 of a preprocessed batch x: the loss's formula, per image, over the
        score taps; train_taps=True gives the per-image training loss instead (its teacher features may then come
        from a cache: teacher_feats)."""
        t = self.taps
        s_idx, t_idx = (t.train_student, t.train_teacher) if train_taps else (t.score_student, t.score_teacher)
        if teacher_feats is None:
            teacher_feats = self.teacher_features(x, t_idx)
        return anomaly_score(tapped(self.student(x), s_idx), teacher_feats, self.lam)

    def anomaly_map(self, x) -> torch.Tensor:
        """(B, S, S) mismatch map over the score taps for a preprocessed batch x of size S (anomaly_map)."""
        prefix = 1 + self.teacher.cfg.registers if hasattr(self.teacher.cfg, "registers") else 0
        s = tapped(self.student(x), self.taps.score_student)
        return anomaly_map(s, self.teacher_features(x, self.taps.score_teacher), x.shape[-1], self.lam, prefix)

    def gradient_map(self, x, sigma: float = 4.0) -> torch.Tensor:
        """(B, S, S) the paper's localisation, as its code computes it with `localization_method: gradients`
        (test_functions.py; the code also offers smoothed and guided-backprop gradients, guided its config's default):
        |d score / d pixel| summed over the colour channels, scaled per image to [0, 1] by its minimum and 99th
        percentile (clipped), then Gaussian-smoothed (sigma 4 px). Gradients flow through both networks."""
        x = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            s = tapped(self.student(x), self.taps.score_student)
            t = tapped(self.teacher(x), self.taps.score_teacher)
            (grad,) = torch.autograd.grad(anomaly_score(s, t, self.lam).sum(), x)
        from torchvision.transforms.functional import gaussian_blur  # here: importing torchvision takes a second
        g = grad.float().abs().sum(dim=1)                             # (B, S, S)
        flat = g.flatten(1)
        lo, hi = flat.min(dim=1).values, torch.quantile(flat, 0.99, dim=1)
        g = ((g - lo[:, None, None]) / (hi - lo).clamp_min(1e-12)[:, None, None]).clamp(0, 1)
        k = 2 * int(3 * sigma) + 1
        return gaussian_blur(g[:, None], kernel_size=[k, k], sigma=[sigma, sigma])[:, 0]

    def map(self, x, kind: str = "mismatch") -> torch.Tensor:
        """(B, S, S) float32 anomaly map of a preprocessed batch: 'mismatch' (anomaly_map: the score's formula at
        each location) or 'gradient' (the paper's gradient_map)."""
        if kind == "gradient":
            return self.gradient_map(x).float()
        with torch.inference_mode():
            return self.anomaly_map(x).float()


## --------------------------------------------------------------------------------------------------------
## Teacher and student of each backbone.

def load_teacher(path, backbone: str, image_size: int, mean=None, std=None, heads=None):
    """The frozen teacher for --backbone, with its input mean/std in .cfg (the checkpoint's own unless given) and,
    for a ViT, `heads` attention heads where its checkpoint does not say (vit.load_vit); a file of the other
    family is refused."""
    keys = read_header(path).keys()
    is_vgg = any(k.startswith("features.") for k in keys)
    if backbone == "vit" and is_vgg:
        raise CheckpointError(f"{path} is a VGG checkpoint, not a ViT: use --backbone vgg, or a ViT teacher")
    if backbone == "vgg" and not is_vgg and any("embed" in k or k.startswith("conv_proj") for k in keys):
        raise CheckpointError(f"{path} is a ViT checkpoint, not VGG16: use --backbone vit, or a VGG16 teacher")
    if backbone == "vgg" and image_size < 32:
        raise CheckpointError(f"--image-size {image_size} is too small for VGG16's five 2x2 pools: use 32 or more")
    teacher = load_vit(path, image_size, heads) if backbone == "vit" else load_vgg16(path)
    if mean is not None or std is not None:
        teacher.cfg = replace(teacher.cfg, mean=tuple(mean or teacher.cfg.mean), std=tuple(std or teacher.cfg.std))
    return teacher.requires_grad_(False).eval()


def student_config_for(backbone: str, teacher):
    return student_config(teacher.cfg) if backbone == "vit" else CLONER


def make_student(backbone: str, teacher):
    cfg = student_config_for(backbone, teacher)
    return ViT(cfg) if backbone == "vit" else VGG(cfg)


def channels_last(backbone: str) -> bool:
    """VGG's convolutions run faster on NHWC tensors; the ViT's token matrices do not care."""
    return backbone == "vgg"


def place(model, device, backbone: str):
    """A teacher or student on the device, in the memory layout its backbone prefers."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last(backbone) else model


def taps_for(backbone: str, teacher) -> Taps:
    return vit_taps(teacher.cfg.depth) if backbone == "vit" else vgg_taps()
