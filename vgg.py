"""VGG written out by hand: the KDAD paper's teacher (VGG16) and its thin student (the "cloner").

Follows "Very Deep Convolutional Networks" (Simonyan & Zisserman, arXiv 1409.1556), configuration D, in the
layer order of torchvision's `features` so its checkpoints load key for key, and the student of "Multiresolution
Knowledge Distillation for Anomaly Detection" (Salehi et al., arXiv 2011.11108), section 3 / the paper's code.

A VGG is a list of widths: a number is a 3x3 conv (padding 1) + ReLU, 'M' a 2x2 max-pool that halves the
resolution and ends a stage. `VGG.forward` returns the output of every max-pool: the five stage outputs that
KDAD taps (distill.py says which).

    teacher = load_vgg16("vgg16.safetensors")   # torchvision `features.N.*` or timm `vgg16.tv_in1k` keys
    stages = teacher(images)                    # 5 tensors: (B, 64, H/2, W/2) ... (B, 512, H/32, W/32)
    student = VGG(CLONER)                       # thin, BatchNorm, no conv bias
"""
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from checkpoint import CheckpointError, check_finite, check_state_dict, read_tensors
from layouts import IMAGENET_MEAN, IMAGENET_STD


@dataclass
class VGGConfig:
    """Defaults are VGG16 (configuration D) as torchvision builds it: conv bias, no BatchNorm."""
    widths: list = field(default_factory=lambda: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                                                  512, 512, 512, "M", 512, 512, 512, "M"])
    batch_norm: bool = False  # BatchNorm after every conv except the last of each stage (the paper's cloner)
    bias: bool = True
    mean: tuple = IMAGENET_MEAN  # input normalisation the weights expect
    std: tuple = IMAGENET_STD


## The cloner (the paper's code, models/network.py, configuration 'B'): mostly 16-channel convs, but the last conv
## of stages 2-5 widens to the teacher's channels so each stage output can be compared with the teacher's. 0.34M
## parameters, against VGG16's 14.7M.
CLONER = VGGConfig(widths=[16, 16, "M", 16, 128, "M", 16, 16, 256, "M", 16, 16, 512, "M", 16, 16, 512, "M"],
                   batch_norm=True, bias=False)


class VGG(nn.Module):
    def __init__(self, cfg: VGGConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or VGGConfig()
        layers, c_in = [], 3
        for w, nxt in zip(cfg.widths, cfg.widths[1:] + ["M"], strict=True):
            if w == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            layers.append(nn.Conv2d(c_in, w, kernel_size=3, padding=1, bias=cfg.bias))
            if cfg.batch_norm and nxt != "M":  # the conv that feeds a pool has ReLU only (the paper's code)
                layers.append(nn.BatchNorm2d(w))
            layers.append(nn.ReLU(inplace=True))
            c_in = w
        self.features = nn.Sequential(*layers)  # same indices as torchvision's vgg16().features
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)  # the paper's code initialises the cloner this way
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x) -> list[torch.Tensor]:
        stages = []
        for layer in self.features:
            x = layer(x)
            if isinstance(layer, nn.MaxPool2d):
                stages.append(x)  # (B, C_s, H / 2^s, W / 2^s) for s = 1..5
        return stages

    @property
    def stage_channels(self) -> list[int]:
        ws = self.cfg.widths
        return [ws[i - 1] for i, w in enumerate(ws) if w == "M"]


def load_vgg16(path) -> VGG:
    """VGG16 from torchvision `features.N.{weight,bias}` keys (timm's vgg16.tv_in1k has the same); heads ignored."""
    sd = read_tensors(path)
    if not any(k.startswith("features.") for k in sd):
        raise CheckpointError(f"{path} is not a VGG16 checkpoint (no features.* tensors); "
                              f"first keys: {', '.join(sorted(sd)[:3])}")
    sd = {k: v for k, v in sd.items() if not k.startswith(("classifier.", "pre_logits.", "head."))}
    check_finite(path, sd)
    model = VGG()
    check_state_dict(path, sd, model.state_dict(), "VGG16")
    model.load_state_dict(sd)
    return model.eval()
