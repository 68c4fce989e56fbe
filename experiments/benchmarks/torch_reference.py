"""PyTorch references of lensjax's networks, for `bench_train.py` only.

Same architectures, widths and parameter counts as lensjax.models.resnet
(ResNet-18), lensjax.models.mae (ViT MAE) and lensjax.models.unet (diffusion
UNet), written in plain PyTorch (NCHW images for the conv nets, as PyTorch
expects). Nothing in lensjax imports this module, and torch is a
benchmark-only requirement (requirements-bench.txt).

Differences that do not change the amount of work:
- Stride-2 convolutions pad symmetrically (PyTorch `padding=k // 2`); lensjax
  uses XLA "SAME" padding, which puts the odd pixel of padding at the bottom and
  right. Output shapes and FLOPs are identical.
- Initialisation follows each lensjax module's scheme but draws from PyTorch's
  generator, so the numbers differ (speed does not depend on them).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------
# ResNet-18 (lensjax.models.resnet)
# ----------------------------------------------------------------------------


def _conv(cin: int, cout: int, kernel: int, stride: int, bias: bool = False) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, bias=bias)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


def _bn(features: int) -> nn.BatchNorm2d:
    # momentum 0.1 here is Flax's momentum 0.9 (lensjax's setting).
    return nn.BatchNorm2d(features, eps=1e-5, momentum=0.1)


class BasicBlock(nn.Module):
    """Two 3x3 convs + BatchNorm, projection shortcut where the shape changes."""

    def __init__(self, cin: int, features: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = _conv(cin, features, 3, stride), _bn(features)
        self.conv2, self.bn2 = _conv(features, features, 3, 1), _bn(features)
        self.shortcut = None
        if stride != 1 or cin != features:
            self.shortcut = nn.Sequential(_conv(cin, features, 1, stride), _bn(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu((x if self.shortcut is None else self.shortcut(x)) + y)


class ResNet18(nn.Module):
    """images (B, C, H, W) -> logits (B, num_classes); stem "small" or "imagenet"."""

    def __init__(self, num_classes: int, *, in_channels: int = 1, width: int = 64,
                 stem: str = "small"):
        super().__init__()
        if stem == "imagenet":
            self.stem = nn.Sequential(_conv(in_channels, width, 7, 2), _bn(width), nn.ReLU(),
                                      nn.MaxPool2d(3, 2, 1))
        else:
            self.stem = nn.Sequential(_conv(in_channels, width, 3, 1), _bn(width), nn.ReLU())
        blocks, cin = [], width
        for stage in range(4):
            features = width * 2 ** stage
            for index in range(2):
                blocks.append(BasicBlock(cin, features, 2 if stage > 0 and index == 0 else 1))
                cin = features
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


# ----------------------------------------------------------------------------
# ViT MAE (lensjax.models.vit, lensjax.models.mae)
# ----------------------------------------------------------------------------


def _linear(cin: int, cout: int) -> nn.Linear:
    layer = nn.Linear(cin, cout)
    nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def sincos_2d(dim: int, rows: int, cols: int) -> torch.Tensor:
    """(rows * cols, dim) fixed embedding, the convention of lensjax.models.vit."""
    def one_axis(d, positions):
        omega = 1.0 / 10000.0 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2.0))
        angles = positions.reshape(-1, 1).double() * omega[None]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    row, col = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.cat([one_axis(dim // 2, col), one_axis(dim // 2, row)], dim=1).float()


class Block(nn.Module):
    """Pre-norm transformer block (LayerNorm eps 1e-6, exact GELU), fused q/k/v."""

    def __init__(self, width: int, heads: int, mlp_dim: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width, eps=1e-6), nn.LayerNorm(width, eps=1e-6)
        self.qkv, self.proj = _linear(width, 3 * width), _linear(width, width)
        self.fc1, self.fc2 = _linear(width, mlp_dim), _linear(mlp_dim, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(batch, length, 3, self.heads, width // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, length, width)
        x = x + self.proj(attn)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


def patchify(images: torch.Tensor, p: int) -> torch.Tensor:
    """(B, H, W, C) -> (B, N, p*p*C), the order of lensjax.models.vit.patchify."""
    b, h, w, c = images.shape
    x = images.reshape(b, h // p, p, w // p, p, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


class MAE(nn.Module):
    """MAE with a ViT encoder on visible patches and a light decoder; forward returns the loss."""

    def __init__(self, *, image_size: int = 64, patch_size: int = 8, in_channels: int = 1,
                 width: int = 384, depth: int = 12, heads: int = 6, mask_ratio: float = 0.75,
                 decoder_width: int = 128, decoder_depth: int = 2, decoder_heads: int = 4):
        super().__init__()
        grid = image_size // patch_size
        self.patch_size, self.num_patches = patch_size, grid * grid
        self.kept = int(self.num_patches * (1.0 - mask_ratio) + 1e-6)
        patch_dim = patch_size ** 2 * in_channels
        self.patch_embed = _linear(patch_dim, width)
        self.cls_token = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.blocks = nn.ModuleList(Block(width, heads, 4 * width) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.decoder_embed = _linear(width, decoder_width)
        self.mask_token = nn.Parameter(torch.randn(1, 1, decoder_width) * 0.02)
        self.decoder_blocks = nn.ModuleList(Block(decoder_width, decoder_heads, 4 * decoder_width)
                                            for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_width, eps=1e-6)
        self.decoder_pred = _linear(decoder_width, patch_dim)
        self.register_buffer("pos", sincos_2d(width, grid, grid), persistent=False)
        self.register_buffer("decoder_pos", sincos_2d(decoder_width, grid, grid), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, H, W, C) -> MSE on masked patches ()."""
        target = patchify(images, self.patch_size)
        tokens = self.patch_embed(target) + self.pos
        batch, n, width = tokens.shape
        shuffle = torch.argsort(torch.rand(batch, n), dim=1)
        restore = torch.argsort(shuffle, dim=1)
        keep = shuffle[:, :self.kept]
        x = torch.gather(tokens, 1, keep[..., None].expand(-1, -1, width))
        x = torch.cat([self.cls_token.expand(batch, -1, -1), x], dim=1)
        for block in self.blocks:
            x = block(x)
        x = self.decoder_embed(self.norm(x))
        cls, visible = x[:, :1], x[:, 1:]
        mask_tokens = self.mask_token.expand(batch, n - visible.shape[1], -1)
        x = torch.gather(torch.cat([visible, mask_tokens], dim=1), 1,
                         restore[..., None].expand(-1, -1, x.shape[-1])) + self.decoder_pos
        x = torch.cat([cls, x], dim=1)
        for block in self.decoder_blocks:
            x = block(x)
        pred = self.decoder_pred(self.decoder_norm(x))[:, 1:]
        mask = (restore >= self.kept).float()
        per_patch = ((pred - target) ** 2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum().clamp(min=1.0)


# ----------------------------------------------------------------------------
# Diffusion UNet (lensjax.models.unet)
# ----------------------------------------------------------------------------


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, time scale-shift on the second norm, residual."""

    def __init__(self, cin: int, features: int, time_features: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-5)
        self.conv1 = nn.Conv2d(cin, features, 3, padding=1)
        self.time_proj = nn.Linear(time_features, 2 * features)
        self.norm2 = nn.GroupNorm(groups, features, eps=1e-5)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        self.shortcut = nn.Conv2d(cin, features, 1) if cin != features else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.time_proj(F.silu(emb)).chunk(2, dim=-1)
        h = self.norm2(h) * (1.0 + scale[:, :, None, None]) + shift[:, :, None, None]
        h = self.conv2(F.silu(h))
        return (x if self.shortcut is None else self.shortcut(x)) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over H*W positions of a GroupNorm'd input, residual."""

    def __init__(self, features: int, heads: int, groups: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, features, eps=1e-5)
        self.qkv = nn.Linear(features, 3 * features)
        self.proj = nn.Linear(features, features)
        nn.init.zeros_(self.proj.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)                    # (B, HW, C)
        q, k, v = self.qkv(tokens).reshape(b, h * w, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, h * w, c)
        return x + self.proj(out).transpose(1, 2).reshape(b, c, h, w)


class UNet(nn.Module):
    """x_t (B, C, H, W), t (B,) -> prediction (B, C, H, W); block layout of lensjax's UNet."""

    def __init__(self, *, in_channels: int = 1, base_width: int = 64,
                 channel_mults: tuple[int, ...] = (1, 2, 2, 4), num_res_blocks: int = 2,
                 attention_levels: tuple[int, ...] = (3,), heads: int = 4,
                 mid_attention: bool = True, groups: int = 32):
        super().__init__()
        widths = [base_width * m for m in channel_mults]
        self.num_levels, self.num_res_blocks = len(widths), num_res_blocks
        self.multiple = 2 ** (self.num_levels - 1)
        self.base_width = base_width
        tf = 4 * base_width
        self.time_mlp1, self.time_mlp2 = nn.Linear(base_width, tf), nn.Linear(tf, tf)
        self.stem = nn.Conv2d(in_channels, base_width, 3, padding=1)
        self.down_blocks, self.down_attention = nn.ModuleList(), nn.ModuleList()
        self.downsamples = nn.ModuleList()
        skips, width = [base_width], base_width
        for level, lw in enumerate(widths):
            for _ in range(num_res_blocks):
                self.down_blocks.append(ResBlock(width, lw, tf, groups))
                self.down_attention.append(AttentionBlock(lw, heads, groups)
                                           if level in attention_levels else nn.Identity())
                width = lw
                skips.append(width)
            if level < self.num_levels - 1:
                self.downsamples.append(nn.Conv2d(width, width, 3, 2, padding=1))
                skips.append(width)
        self.mid_block1 = ResBlock(width, width, tf, groups)
        self.mid_attention = AttentionBlock(width, heads, groups) if mid_attention else nn.Identity()
        self.mid_block2 = ResBlock(width, width, tf, groups)
        self.up_blocks, self.up_attention = nn.ModuleList(), nn.ModuleList()
        self.upsamples = nn.ModuleList()
        for level in reversed(range(self.num_levels)):
            for _ in range(num_res_blocks + 1):
                self.up_blocks.append(ResBlock(width + skips.pop(), widths[level], tf, groups))
                self.up_attention.append(AttentionBlock(widths[level], heads, groups)
                                         if level in attention_levels else nn.Identity())
                width = widths[level]
            if level > 0:
                self.upsamples.append(nn.Conv2d(width, width, 3, padding=1))
        self.out_norm = nn.GroupNorm(groups, width, eps=1e-5)
        self.out_conv = nn.Conv2d(width, in_channels, 3, padding=1)
        nn.init.zeros_(self.out_conv.weight)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time_mlp2(F.silu(self.time_mlp1(timestep_embedding(t, self.base_width))))
        height, width = x.shape[2:]
        pad_h = -(-height // self.multiple) * self.multiple - height
        pad_w = -(-width // self.multiple) * self.multiple - width
        pads = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
        h = F.pad(x, pads, mode="reflect") if pad_h or pad_w else x
        h = self.stem(h)
        skips, blocks = [h], iter(zip(self.down_blocks, self.down_attention))
        for level in range(self.num_levels):
            for _ in range(self.num_res_blocks):
                block, attention = next(blocks)
                h = attention(block(h, emb))
                skips.append(h)
            if level < self.num_levels - 1:
                h = self.downsamples[level](h)
                skips.append(h)
        h = self.mid_block2(self.mid_attention(self.mid_block1(h, emb)), emb)
        blocks, upsamples = iter(zip(self.up_blocks, self.up_attention)), iter(self.upsamples)
        for level in reversed(range(self.num_levels)):
            for _ in range(self.num_res_blocks + 1):
                block, attention = next(blocks)
                h = attention(block(torch.cat([h, skips.pop()], dim=1), emb))
            if level > 0:
                h = next(upsamples)(F.interpolate(h, scale_factor=2, mode="nearest"))
        h = self.out_conv(F.silu(self.out_norm(h)))
        return h[:, :, pads[2]:h.shape[2] - pads[3], pads[0]:h.shape[3] - pads[1]]


# ----------------------------------------------------------------------------
# Optimiser: lensjax.train.make_optimizer's AdamW
# ----------------------------------------------------------------------------


def adamw(model: nn.Module, lr: float, weight_decay: float, **kwargs) -> torch.optim.AdamW:
    """AdamW with weight decay on tensors of rank >= 2 only (as lensjax's optimiser mask)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, **kwargs)
