"""ArcFace ResNet-18 ("IRBlock" ResNet, 128x128 grey input, 512-d embedding) for the IDS metric.

This is the identity network of the GFPGAN / VQFR identity protocol ("Deg." / IDS): the file
``arcface_resnet18.pth`` released with GFPGAN v0.1.0. The module names below are the checkpoint's key
names (``conv1``, ``bn1``, ``prelu``, ``layer1..4`` of IRBlocks with ``bn0/conv1/bn1/prelu/conv2/bn2`` and a
1x1 ``downsample``, then ``bn4``, ``fc5`` (512*8*8 -> 512) and ``bn5``); the checkpoint is loaded strictly
through `diffbir_core.weights.load_into`.

Protocol (`embed`): RGB in [0, 1] -> grey with 0.2989 R + 0.5870 G + 0.1140 B -> bilinear resize to
128x128 (align_corners=False) -> (x - 0.5) / 0.5 -> network -> 512-d embedding. IDS is the cosine
similarity of the embeddings of the restored image and the ground truth (``ids_cos``, higher is better); the
angle arccos(cos) in degrees is the "Deg." number of GFPGAN / VQFR (``ids_deg``, lower is better).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ResNetArcFace", "embed", "INPUT_SIZE"]

INPUT_SIZE = 128


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class IRBlock(nn.Module):
    """Improved residual block: BN -> conv -> BN -> PReLU -> conv(stride) -> BN, + shortcut, PReLU.

    One PReLU module serves both activations (as in the checkpoint, which has one ``prelu.weight``).
    """

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.bn0 = nn.BatchNorm2d(cin)
        self.conv1 = _conv3x3(cin, cin)
        self.bn1 = nn.BatchNorm2d(cin)
        self.prelu = nn.PReLU()
        self.conv2 = _conv3x3(cin, cout, stride)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.prelu(self.bn1(self.conv1(self.bn0(x))))))
        skip = x if self.downsample is None else self.downsample(x)
        return self.prelu(out + skip)


class ResNetArcFace(nn.Module):
    """ResNet-18-style ArcFace trunk: input [N,1,128,128] in [-1, 1], output [N,512]."""

    def __init__(self, layers: tuple[int, int, int, int] = (2, 2, 2, 2)):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.prelu = nn.PReLU()
        self.maxpool = nn.MaxPool2d(2, 2)
        widths = (64, 128, 256, 512)
        cin = 64
        for i, (w, n) in enumerate(zip(widths, layers)):
            blocks = [IRBlock(cin, w, stride=1 if i == 0 else 2)] + [IRBlock(w, w) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            cin = w
        self.bn4 = nn.BatchNorm2d(512)
        self.dropout = nn.Dropout()
        self.fc5 = nn.Linear(512 * 8 * 8, 512)
        self.bn5 = nn.BatchNorm1d(512)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.prelu(self.bn1(self.conv1(x))))  # [N,64,64,64]
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # [N,512,8,8]
        x = self.dropout(self.bn4(x)).flatten(1)  # [N,32768]
        return self.bn5(self.fc5(x))  # [N,512]


def embed(net: ResNetArcFace, rgb: torch.Tensor) -> torch.Tensor:
    """[N,3,H,W] RGB in [0,1] -> [N,512] embeddings, following the protocol in the module doc."""
    grey = (0.2989 * rgb[:, 0] + 0.5870 * rgb[:, 1] + 0.1140 * rgb[:, 2]).unsqueeze(1)  # [N,1,H,W]
    grey = F.interpolate(grey, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
    return net((grey - 0.5) / 0.5)
