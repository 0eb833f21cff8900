"""Sliding-window attention on the band only: each query attends to the keys within +-`half`
positions of it (and, with padding, to the real ones among them), as a mask over the whole
(s, s) score matrix would allow, at the cost of the band instead of the matrix.

The queries are cut into blocks of `2 * half` positions; block j's keys are the window around
it, positions [j * B - half, (j + 1) * B + half), so one SDPA call over (blocks, B, B + 2 half)
covers every query's window with the band's mask inside it. At ModernBERT's window (half = 64)
and 1024 tokens that is a quarter of the score matrix: SDPA with the full (s, s) mask computes
every score and masks 7/8 of them away. The keys and values of neighbouring blocks overlap, so
they are held twice (the block of B queries reads 2B keys).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def band_mask(s: int, half: int, block: int, key_real: torch.Tensor | None, device) -> torch.Tensor:
    """True = attend, (b|1, blocks, 1, block, block + 2 half): |query - key| <= half, the key inside
    [0, s) and real (`key_real` (b, s) bool, None = all real); a query also always sees itself, so
    that no row of the softmax is empty (a padding query's window may hold padding only; nobody
    reads its output)."""
    blocks, width = -(-s // block), block + 2 * half
    i = torch.arange(block, device=device)[:, None]
    t = torch.arange(width, device=device)[None, :]
    band = (t >= i) & (t <= i + 2 * half)  # (block, width): key t of query i, offset by half
    key_pos = (torch.arange(blocks, device=device) * block - half)[:, None] + torch.arange(width, device=device)
    valid = (key_pos >= 0) & (key_pos < s)  # (blocks, width)
    if key_real is None:
        valid = valid[None]
    else:  # the real flags at the window's positions (outside [0, s): False)
        padded = F.pad(key_real, (half, blocks * block - s + half))
        valid = valid[None] & padded.unfold(1, width, block)  # (b, blocks, width)
    itself = t == i + half
    return ((band & valid[:, :, None, :]) | itself)[:, :, None]


def sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, half: int,
                             key_real: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) masked to |query - key| <= half and to real keys) v, without
    dropout; q, k, v (b, n, s, d), the result (b, n, s, d)."""
    b, n, s, d = q.shape
    block = 2 * half
    blocks, width = -(-s // block), 2 * half + block
    tail = blocks * block - s

    def windows(x: torch.Tensor) -> torch.Tensor:  # (b, n, s, d) -> (b * blocks, n, width, d)
        x = F.pad(x, (0, 0, half, tail + half)).unfold(2, width, block)  # (b, n, blocks, d, width)
        return x.permute(0, 2, 1, 4, 3).reshape(b * blocks, n, width, d)

    qb = F.pad(q, (0, 0, 0, tail)).view(b, n, blocks, block, d).transpose(1, 2).reshape(b * blocks, n, block, d)
    mask = band_mask(s, half, block, key_real, q.device).expand(b, -1, -1, -1, -1).reshape(b * blocks, 1, block, width)
    out = F.scaled_dot_product_attention(qb, windows(k), windows(v), attn_mask=mask)  # (b * blocks, n, block, d)
    return out.view(b, blocks, n, block, d).transpose(1, 2).reshape(b, n, blocks * block, d)[:, :, :s]
