"""Built-in models sized for 8x8 digits, each a plain ``nn.Module``.

They cover the layer patterns compression has to handle: plain MLP
(``lenet300``), conv + pooling (``lenet5``), residual adds with BatchNorm and a
downsampling shortcut (``resnet8``), depthwise-separable inverted residuals
(``mobilenetv2``) and multi-head attention with LayerNorm (``vit``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F


class LeNet300(nn.Module):
    """LeNet-300-100 of Deep Compression, with 64 inputs instead of 784."""

    def __init__(self, in_features: int = 64, num_classes: int = 10, hidden: tuple[int, int] = (300, 100)):
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(in_features, hidden[0])
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.fc3 = nn.Linear(hidden[1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(x)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class LeNet5(nn.Module):
    """Two conv + max-pool layers and three fully connected layers."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: float = 1.0):
        super().__init__()
        c1, c2 = max(1, round(16 * width)), max(1, round(32 * width))
        self.conv1 = nn.Conv2d(in_channels, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(c2 * 2 * 2, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = self.flatten(x)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet8(nn.Module):
    """Stem conv, three basic blocks (the last two downsample), global pool, classifier."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(in_channels, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.layer1 = BasicBlock(w, w)
        self.layer2 = BasicBlock(w, 2 * w, stride=2)
        self.layer3 = BasicBlock(2 * w, 4 * w, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.flatten(self.pool(x)))


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise (3x3) -> project (1x1), residual when shapes allow."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand: int):
        super().__init__()
        hidden = in_ch * expand
        self.use_residual = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(in_ch, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """A MobileNetV2 with five inverted-residual blocks, for 8x8 inputs."""

    # (expansion, out channels, stride) per block
    BLOCKS = ((1, 16, 1), (4, 24, 2), (4, 24, 1), (4, 32, 2), (4, 32, 1))

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: float = 1.0, last_channels: int = 128):
        super().__init__()

        def ch(c: int) -> int:
            return max(8, int(round(c * width / 8)) * 8)

        stem = ch(16)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU6())
        blocks, in_ch = [], stem
        for expand, out, stride in self.BLOCKS:
            blocks.append(InvertedResidual(in_ch, ch(out), stride, expand))
            in_ch = ch(out)
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Conv2d(in_ch, last_channels, 1, bias=False), nn.BatchNorm2d(last_channels), nn.ReLU6())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(last_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(self.flatten(self.pool(x)))


class Attention(nn.Module):
    """Multi-head self-attention with separate q/k/v/out projections (so heads can be pruned)."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.head_dim = head_dim
        inner = heads * head_dim
        self.q = nn.Linear(dim, inner)
        self.k = nn.Linear(dim, inner)
        self.v = nn.Linear(dim, inner)
        self.out = nn.Linear(inner, dim)
        self.softmax = nn.Softmax(dim=-1)  # a module, so hooks can see the attention maps (distillation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        heads = self.q.out_features // self.head_dim  # follows the layer, so heads can be pruned away

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, n, heads, self.head_dim).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        attn = self.softmax((q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim)))
        out = (attn @ v).transpose(1, 2).reshape(b, n, heads * self.head_dim)
        return self.out(out)


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dim // heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    """A small pre-norm vision transformer: 2x2 patches, class token, learned positions."""

    def __init__(
        self,
        image_size: int = 8,
        patch: int = 2,
        in_channels: int = 1,
        num_classes: int = 10,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        mlp_dim: int = 128,
    ):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image_size {image_size} is not a multiple of patch {patch}")
        if dim % heads:
            raise ValueError(f"dim {dim} is not a multiple of heads {heads}")
        tokens = (image_size // patch) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*(TransformerBlock(dim, heads, mlp_dim) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


@dataclass(frozen=True)
class ZooEntry:
    """A zoo model and the training settings (``TrainConfig`` fields) that reach its accuracy floor on digits."""

    build: Callable[..., nn.Module]
    description: str
    train: dict[str, Any] = field(default_factory=dict)


ZOO: dict[str, ZooEntry] = {
    "lenet300": ZooEntry(LeNet300, "MLP 64-300-100-10 (LeNet-300-100)", {"epochs": 30, "lr": 1e-3}),
    "lenet5": ZooEntry(
        LeNet5, "2 conv + 3 fc (LeNet-5 style)", {"epochs": 60, "lr": 3e-3, "label_smoothing": 0.1, "augment": True}
    ),
    "resnet8": ZooEntry(ResNet8, "residual CNN, BatchNorm, downsampling shortcuts", {"epochs": 30, "lr": 2e-3}),
    "mobilenetv2": ZooEntry(
        MobileNetV2, "inverted residuals, depthwise convs, BatchNorm",
        {"epochs": 60, "lr": 5e-3, "warmup_epochs": 3, "augment": True},
    ),
    "vit": ZooEntry(
        ViT,
        "vision transformer: 2x2 patches, 4 blocks, 4 heads",
        {"epochs": 100, "lr": 3e-3, "weight_decay": 0.05, "warmup_epochs": 5, "label_smoothing": 0.1, "augment": True},
    ),
}
