"""The teacher alone, no training: a k-nearest-neighbour baseline that shows what distillation adds.

Each image is reduced to one global feature of the frozen pretrained teacher (image_embedding); a validation or
test image's anomaly score is its mean cosine distance to the k nearest normal training images (knn_scores). The
features come from the teacher passes a run makes anyway: `recorded` collects them while the KDAD scores are
computed (scoring itself does not know), and the training images' features from the teacher-feature cache, else from
one teacher-only pass.

    with recorded(kdad) as features:       # every teacher forward inside also keeps its image features
        scores = score_images(kdad, images, prep, amp)
    knn_scores(bank, torch.cat(features), k=2)
"""
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from evaluate import RECORDINGS, auroc, finite, over_images


def image_embedding(teacher, last: torch.Tensor) -> torch.Tensor:
    """(B, D) float32 global image feature from the teacher's last output `last` (no gradient).

    - ViT, last = (B, tokens, D): the CLS token after the final LayerNorm, the representation of the whole image
      that a ViT's classification head reads (Dosovitskiy et al. 2021, eq. 4) and that DINO's k-NN evaluation
      and Transformaly's pretrained-feature score use; a checkpoint without a final LayerNorm gives the raw token.
    - VGG16, last = pool5 (B, 512, H/32, W/32): averaged over its positions, the global-average-pooled last
      feature map that DN2 and PANDA take from their ResNets (Bergman et al. 2020, arXiv 2002.10445; Reiss et al.
      2021, arXiv 2010.05903)."""
    if last.dim() == 4:
        return last.float().mean(dim=(2, 3))
    norm = getattr(teacher, "norm", None)
    cls = last[:, 0]
    return (norm(cls) if norm is not None else cls).float()


def feature_name(backbone: str, teacher) -> str:
    """What image_embedding returns for this teacher, in words (results.json's knn_feature)."""
    if backbone == "vgg":
        return "pool5, global average"
    return "final normalised CLS token" if getattr(teacher, "norm", None) is not None else "raw CLS token"


@contextmanager
def recorded(kdad):
    """While inside, every forward pass of kdad's teacher also appends its image_embedding (B, D) to the list
    yielded, in call order, on the teacher's device: the baseline's features from the passes scoring makes anyway.
    (A batch that scoring runs again after running out of GPU memory is recorded once: evaluate.RECORDINGS.)"""
    features = []
    hook = kdad.teacher.register_forward_hook(lambda m, _, out: features.append(image_embedding(m, out[-1].detach())))
    RECORDINGS.append(features)
    try:
        yield features
    finally:
        hook.remove()
        RECORDINGS.remove(features)


def knn_scores(bank: torch.Tensor, queries: torch.Tensor, k: int, chunk: int = 4096) -> torch.Tensor:
    """Anomaly score of each query (M,) float32: its mean cosine distance (1 - cos, in [0, 2]) to its k nearest
    neighbours among the bank (N, D) of normal training features; queries (M, D). The k-nearest-neighbour score
    of DN2 (Bergman et al. 2020), with the cosine distance used by PANDA's successors (Reiss & Hoshen 2021,
    arXiv 2106.03844). Raises ValueError unless 1 <= k <= N."""
    if not 1 <= k <= len(bank):
        raise ValueError(f"k = {k} nearest neighbours need at least {k} training images; there are {len(bank)}")
    bank = F.normalize(bank.float(), dim=1)
    out = []
    for q in F.normalize(queries.float(), dim=1).split(chunk):  # (chunk, N) similarities at a time
        nearest = (q @ bank.T).topk(k, dim=1).values                # (chunk, k) largest cosine similarities
        out.append((1 - nearest).mean(dim=1))
    return torch.cat(out) if out else torch.zeros(0)


@torch.inference_mode()
def teacher_embeddings(kdad, images, prep, amp, batch_size=256, plain=False) -> torch.Tensor:
    """(N, D) float32 teacher image features of uint8 images, center-cropped: a teacher-only pass."""
    return torch.cat(over_images(lambda _, x: image_embedding(kdad.teacher, kdad.teacher(x)[-1]), images, prep, amp,
                                 batch_size, "teacher features", plain))


def training_bank(kdad, data, prep, amp, batch_size, cache=None, plain=False) -> torch.Tensor:
    """(N, D) features of the normal training images: from the feature cache when there is one (its last tap is
    the teacher's last output), else from one teacher-only pass."""
    if cache is None:
        return teacher_embeddings(kdad, data.train, prep, amp, batch_size, plain)
    last = cache.tensors[-1]
    return torch.cat([image_embedding(kdad.teacher, last[i:i + batch_size].float())
                      for i in range(0, len(last), batch_size)])


def knn_aurocs(bank: torch.Tensor, val_features: torch.Tensor, test_features: torch.Tensor, data, k: int) -> dict:
    """The teacher-alone baseline's validation and test AUROC (None where a split holds one kind only)."""
    return {"knn_val_auroc": auroc(knn_scores(bank, val_features, k).cpu(), data.val_labels.cpu(), "kNN scores"),
            "knn_test_auroc": auroc(knn_scores(bank, test_features, k).cpu(), data.test_labels.cpu(), "kNN scores")}


def baseline(kdad, data, prep, amp, k: int, features: list, batch_size: int, cache=None, plain=False) -> dict:
    """results.json's kNN figures: `features` recorded over the validation then the test images (recorded)."""
    t0 = time.time()
    seen = finite(torch.cat(features).to(data.val.device), "teacher image features (kNN baseline)")
    bank = finite(training_bank(kdad, data, prep, amp, batch_size, cache, plain).to(seen.device),
                  "teacher image features of the training images (kNN baseline)")
    out = knn_aurocs(bank, seen[:len(data.val)], seen[len(data.val):], data, k)
    return out | {"knn_k": k, "knn_seconds": time.time() - t0}
