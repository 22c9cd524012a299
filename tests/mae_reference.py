"""An independent formulation of MAE's ``MaskedAutoencoderViT`` (facebookresearch/mae,
models_mae.py), written here from the release's rules with torch primitives only (no timm, no
tokenmorph): its state dict is what an official checkpoint holds, in MAE's own key names, and
its forward is MAE's. The tests write checkpoints with it and compare forwards."""

import math

import numpy as np
import torch
from torch import nn


def mae_sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """MAE's get_1d_sincos_pos_embed_from_grid: (M,) positions -> (M, dim), float64."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def mae_sincos_2d(dim: int, side: int, cls_token: bool = True) -> np.ndarray:
    """MAE's get_2d_sincos_pos_embed: meshgrid(grid_w, grid_h) (xy indexing), the first half of
    the channels from grid[0] (the column), the second from grid[1] (the row); a zero row for
    the class token."""
    grid_h = np.arange(side, dtype=np.float32)
    grid_w = np.arange(side, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, side, side)
    emb = np.concatenate([mae_sincos_1d(dim // 2, grid[0]), mae_sincos_1d(dim // 2, grid[1])], 1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, dim]), emb], axis=0)
    return emb


class _Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1)) / math.sqrt(C // self.heads)
        out = attn.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class _Mlp(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x):
        return self.fc2(nn.functional.gelu(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _Mlp(dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _PatchEmbed(nn.Module):
    def __init__(self, patch, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class ReferenceMAE(nn.Module):
    """MAE's autoencoder, MAE's parameter names. ``decoder=False``: the encoder only (the
    mae_pretrain_vit_*.pth layout). Weights are random (seeded) so that a wrong mapping shows."""

    def __init__(self, img=32, patch=4, dim=192, depth=2, heads=3, dec_dim=64, dec_depth=1,
                 dec_heads=2, decoder=True, seed=0):  # fmt: skip
        super().__init__()
        torch.manual_seed(seed)
        side = img // patch
        self.patch = patch
        self.patch_embed = _PatchEmbed(patch, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        pe = torch.from_numpy(mae_sincos_2d(dim, side)).float()[None]
        self.pos_embed = nn.Parameter(pe, requires_grad=False)
        self.blocks = nn.ModuleList(_Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.has_decoder = decoder
        if decoder:
            self.decoder_embed = nn.Linear(dim, dec_dim)
            self.mask_token = nn.Parameter(torch.randn(1, 1, dec_dim) * 0.02)
            dpe = torch.from_numpy(mae_sincos_2d(dec_dim, side)).float()[None]
            self.decoder_pos_embed = nn.Parameter(dpe, requires_grad=False)
            self.decoder_blocks = nn.ModuleList(
                _Block(dec_dim, dec_heads) for _ in range(dec_depth)
            )
            self.decoder_norm = nn.LayerNorm(dec_dim, eps=1e-6)
            self.decoder_pred = nn.Linear(dec_dim, patch * patch * 3)
        with torch.no_grad():  # non-trivial LayerNorm affine parameters
            for m in self.modules():
                if isinstance(m, nn.LayerNorm):
                    m.weight.normal_(1.0, 0.1)
                    m.bias.normal_(0.0, 0.1)

    def forward_encoder(self, x, ids_keep):
        """x: (B, 3, H, W) ImageNet-normalised; ids_keep (B, K) kept tokens (noise order)."""
        x = self.patch_embed(x) + self.pos_embed[:, 1:]
        x = x.gather(1, ids_keep[..., None].expand(-1, -1, x.shape[-1]))
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_decoder(self, latent, ids_restore):
        x = self.decoder_embed(latent)
        B, N = ids_restore.shape
        mask_tokens = self.mask_token.expand(B, N + 1 - x.shape[1], -1)
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)
        x_ = x_.gather(1, ids_restore[..., None].expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def forward(self, x, noise, mask_ratio=0.75):
        """MAE's random_masking from given noise: the smallest noise is kept."""
        N = noise.shape[1]
        keep = int(N * (1 - mask_ratio))
        ids_shuffle = noise.argsort(dim=1)
        ids_restore = ids_shuffle.argsort(dim=1)
        mask = torch.ones_like(noise)
        mask[:, :keep] = 0
        mask = mask.gather(1, ids_restore).bool()
        return self.forward_decoder(
            self.forward_encoder(x, ids_shuffle[:, :keep]), ids_restore
        ), mask

    def save(self, path):
        """An official-layout file: {'model': state_dict}."""
        torch.save({"model": self.state_dict()}, path)
        return path
