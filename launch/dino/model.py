"""DINO's networks, small: a ViT backbone, the projection head with its weight-normalised
last layer, and the multi-crop wrapper that runs the crops of each resolution together.

After ``facebookresearch/dino`` (``vision_transformer.py``, ``utils.MultiCropWrapper``),
written without timm or torchvision. Parameter names follow DINO's, so a state dict reads
like theirs: ``backbone.blocks.0.attn.qkv.weight``, ``head.last_layer.weight_v``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def trunc_normal_(t: torch.Tensor, std: float = 0.02) -> torch.Tensor:
    return nn.init.trunc_normal_(t, std=std, a=-2.0, b=2.0)  # DINO's: cut at +-2, absolute


class DropPath(nn.Module):
    """Stochastic depth per sample, from the global RNG (captured in every checkpoint)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """ViT returning the [CLS] token; the position embedding is interpolated for crops of
    another size than ``img_size`` (the local crops)."""

    def __init__(
        self,
        img_size: int = 32,
        patch_size: int = 8,
        embed_dim: int = 192,
        depth: int = 4,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.patch_size, self.embed_dim = patch_size, embed_dim
        self.patch_embed = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)
        num_patches = (img_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, r) for r in rates)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        trunc_normal_(self.pos_embed)
        trunc_normal_(self.cls_token)
        self.apply(_init_weights)

    def interpolate_pos_encoding(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        n = x.shape[1] - 1
        grid = self.pos_embed.shape[1] - 1
        if n == grid and h == w:
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        side = int(math.sqrt(grid))
        patch_pos = patch_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
        # to the exact grid size (DINO passes a scale factor nudged by 0.1 for the same end)
        patch_pos = F.interpolate(
            patch_pos,
            size=(h // self.patch_size, w // self.patch_size),
            mode="bicubic",
            align_corners=False,
        )
        return torch.cat((cls_pos, patch_pos.permute(0, 2, 3, 1).reshape(1, -1, x.shape[-1])), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = x + self.interpolate_pos_encoding(x, h, w)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 0]


class WeightNormLinear(nn.Module):
    """``nn.utils.weight_norm(nn.Linear(in, out, bias=False))`` (dim 0) as plain
    parameters ``weight_g`` [out, 1] and ``weight_v`` [out, in]: no forward hook, so FSDP2
    shards and gathers both like any other parameter."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        weight = nn.Linear(in_dim, out_dim, bias=False).weight.detach()  # nn.Linear's init
        self.weight_v = nn.Parameter(weight.clone())
        self.weight_g = nn.Parameter(weight.norm(dim=1, keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)
        return F.linear(x, weight)


class DINOHead(nn.Module):
    """MLP -> bottleneck -> L2 normalisation -> weight-normalised last layer. With
    ``norm_last_layer`` the norm ``weight_g`` is fixed at 1 (``requires_grad=False``)."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 512,
        bottleneck_dim: int = 128,
        nlayers: int = 3,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
        for _ in range(nlayers - 2):
            layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
        layers.append(nn.Linear(hidden_dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        self.apply(_init_weights)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        with torch.no_grad():
            self.last_layer.weight_g.fill_(1.0)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x)


class DinoModel(nn.Module):
    """DINO's ``MultiCropWrapper``: the crops of one resolution go through the backbone
    together, then all the [CLS] features through the head at once."""

    def __init__(self, backbone: VisionTransformer, head: DINOHead) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> DinoModel:
        """From the ``model:`` block of the training config (``dino_tiny.yaml``)."""
        m = config.get("model", config)
        backbone = VisionTransformer(
            img_size=m["img_size"],
            patch_size=m["patch_size"],
            embed_dim=m["embed_dim"],
            depth=m["depth"],
            num_heads=m["num_heads"],
            mlp_ratio=m.get("mlp_ratio", 4.0),
            drop_path_rate=m.get("drop_path_rate", 0.0),
        )
        head = DINOHead(
            m["embed_dim"],
            m["out_dim"],
            hidden_dim=m["hidden_dim"],
            bottleneck_dim=m["bottleneck_dim"],
            norm_last_layer=m.get("norm_last_layer", True),
        )
        return cls(backbone, head)

    def forward(
        self, x: torch.Tensor | Sequence[torch.Tensor], return_backbone_features: bool = False
    ) -> Any:
        crops = [x] if isinstance(x, torch.Tensor) else list(x)
        # consecutive crops of the same size form one backbone batch (DINO's order:
        # the global crops first, then the local ones)
        sizes = torch.tensor([c.shape[-1] for c in crops])
        ends = torch.cumsum(torch.unique_consecutive(sizes, return_counts=True)[1], 0).tolist()
        feats, start = [], 0
        for end in ends:
            feats.append(self.backbone(torch.cat(crops[start:end])))
            start = end
        features = torch.cat(feats)
        projections = self.head(features)
        return (features, projections) if return_backbone_features else projections


def params_groups(model: nn.Module) -> list[dict[str, Any]]:
    """DINO's groups: weight decay on matrices only (not on biases and norms); frozen
    parameters left out."""
    regularized, not_regularized = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (not_regularized if name.endswith(".bias") or p.ndim == 1 else regularized).append(p)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
