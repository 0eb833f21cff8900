"""Rotary position embeddings (Su et al. 2021, RoFormer), in the half-split layout of GPT-NeoX and
`transformers` (`rotate_half`): dimension j of a head pairs with j + d/2.

Heads are independent under a rotation, so a TP rank rotates its own heads with the same tables.
"""

from __future__ import annotations

import torch


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (..., d) fp32 for integer `positions` (...): angle position * theta^(-2j/d),
    computed as `transformers`' default RoPE computes it (fp32 inverse frequencies), so the
    tables are bit for bit the reference's."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=positions.device) / head_dim))
    freqs = positions[..., None].float() * inv_freq  # (..., d/2)
    angles = torch.cat((freqs, freqs), dim=-1)  # (..., d)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (b, s, n, d) rotated by the tables (b|1, s, d) of its positions; fp32 inside, x's dtype out."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (xf * cos[:, :, None] + rotated * sin[:, :, None]).to(x.dtype)
