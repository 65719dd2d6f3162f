"""Attention blocks of the query decoder and the 2-D sine positional encoding (thesis §3.5)."""

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def sine_position_encoding(x: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Normalized 2-D sine encoding (DETR / Mask2Former), scale 2*pi.

    Args:
        x: (B, C, H, W) feature map (only its size, device and dtype are used).
        dim: channels of the encoding (even).
    Returns:
        (1, H*W, dim) encoding: the first dim/2 channels encode y, the rest x.
    """
    h, w = x.shape[-2:]
    npf = dim // 2
    eps, scale = 1e-6, 2 * math.pi
    y_embed = torch.arange(1, h + 1, device=x.device, dtype=torch.float32)[:, None].expand(h, w)
    x_embed = torch.arange(1, w + 1, device=x.device, dtype=torch.float32)[None, :].expand(h, w)
    y_embed = y_embed / (h + eps) * scale
    x_embed = x_embed / (w + eps) * scale
    dim_t = torch.arange(npf, device=x.device, dtype=torch.float32)
    dim_t = temperature ** (2 * (dim_t // 2) / npf)
    pos_x = x_embed[..., None] / dim_t
    pos_y = y_embed[..., None] / dim_t
    pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=3).flatten(2)
    pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=3).flatten(2)
    pos = torch.cat((pos_y, pos_x), dim=2).flatten(0, 1)  # (H*W, C)
    return pos.to(x.dtype).unsqueeze(0)


class AttentionLayer(nn.Module):
    """Multi-head attention with residual, dropout and post-/pre-norm; batch-first (B, L, D).

    Used as cross-attention (queries -> memory) and self-attention (queries -> queries). Positional
    embeddings are added to queries and keys, never to values.
    """

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0, pre_norm: bool = False):
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.pre_norm = pre_norm
        for p in self.attn.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor,
        query_pos: Optional[torch.Tensor] = None,
        pos: Optional[torch.Tensor] = None,
        attn_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """tgt: (B, Q, D); memory: (B, L, D); query_pos: (B|1, Q, D); pos: (B|1, L, D) -> (B, Q,
        D)."""
        q = self.norm(tgt) if self.pre_norm else tgt
        if memory is tgt:  # self-attention: keys/values are the (normalized) queries themselves
            memory = q
        k = memory if pos is None else memory + pos
        q = q if query_pos is None else q + query_pos
        out = self.attn(q, k, memory, attn_mask=attn_mask, need_weights=False)[0]
        tgt = tgt + self.dropout(out)
        return tgt if self.pre_norm else self.norm(tgt)


class FFNLayer(nn.Module):
    """Linear(D, F) -> ReLU -> dropout -> Linear(F, D), residual, post-/pre-norm."""

    def __init__(
        self, d_model: int, dim_feedforward: int, dropout: float = 0.0, pre_norm: bool = False
    ):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.pre_norm = pre_norm
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, tgt: torch.Tensor) -> torch.Tensor:
        x = self.norm(tgt) if self.pre_norm else tgt
        x = self.linear2(self.dropout(F.relu(self.linear1(x))))
        tgt = tgt + self.dropout(x)
        return tgt if self.pre_norm else self.norm(tgt)
