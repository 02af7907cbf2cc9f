"""Reference attention backend: PyTorch SDPA, one call per query segment.

Exact in float32 on CPU (PyTorch's math kernel) and usable on any GPU. GQA uses SDPA's
``enable_gqa`` so the K/V heads are not materialised once per query head. A segment with an
empty key range returns zeros, like the varlen flash kernels (a chunk with no caption tokens).

Legend: L tokens, N query heads, G K/V heads, D head dim, S segments.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_ranges: torch.Tensor,
    k_ranges: torch.Tensor,
) -> torch.Tensor:
    """Range-masked attention (contract: ``magi.attention.attention``).

    Args:
        q: [Lq, N, D]; k, v: [Lk, G, D]; q_ranges, k_ranges: [S, 2] int.

    Returns:
        [Lq, N, D] in q's dtype.
    """
    out = torch.zeros_like(q)
    gqa = q.shape[1] != k.shape[1]
    for (q0, q1), (k0, k1) in zip(q_ranges.tolist(), k_ranges.tolist()):
        if q1 <= q0 or k1 <= k0:
            continue
        qs = rearrange(q[q0:q1], "l n d -> n l d")
        ks = rearrange(k[k0:k1], "l g d -> g l d")
        vs = rearrange(v[k0:k1], "l g d -> g l d")
        o = F.scaled_dot_product_attention(qs, ks, vs, enable_gqa=gqa)  # [N, l, D]
        out[q0:q1] = rearrange(o, "n l d -> l n d")
    return out
