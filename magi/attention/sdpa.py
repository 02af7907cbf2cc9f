"""Reference attention backend: PyTorch SDPA, one call per query segment.

Exact in float32 on CPU (PyTorch's math kernel) and usable on any GPU. GQA uses SDPA's
``enable_gqa`` so the K/V heads are not materialised once per query head. A segment with an
empty key range returns zeros, like the varlen flash kernels (a chunk with no caption tokens).

bf16 / fp16 on CPU follow the rounding of the GPU flash kernels instead of PyTorch's CPU kernel:
scores, row maxima and row sums in float32, the *unnormalised* probabilities exp(s - max) rounded
to the input dtype for the P @ V product (float32 accumulation), division by the float32 row sum
last. This is what the official bf16 runs compute (flash-attn), and the official fp8 reference
fixture agrees with it bit for bit; PyTorch's CPU kernel rounds differently, which moves a few
bf16 ulps that the fp8 re-quantisation of the next layer amplifies to ~1 %.

Legend: L tokens, N query heads, G K/V heads, D head dim, S segments.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange

from magi.attention.masks import Ranges, range_pairs

REDUCED_DTYPES = (torch.bfloat16, torch.float16)
# Score elements held at once by the flash-rounding path (float32 scores + probabilities).
SCORE_BUDGET = 1 << 24


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_ranges: Ranges,
    k_ranges: Ranges,
) -> torch.Tensor:
    """Range-masked attention (contract: ``magi.attention.attention``).

    Args:
        q: [Lq, N, D]; k, v: [Lk, G, D]; q_ranges, k_ranges: [S, 2] int tensors or int pairs.

    Returns:
        [Lq, N, D] in q's dtype.
    """
    out = torch.zeros_like(q)
    gqa = q.shape[1] != k.shape[1]
    flash_rounding = q.dtype in REDUCED_DTYPES and q.device.type == "cpu"
    for (q0, q1), (k0, k1) in zip(range_pairs(q_ranges), range_pairs(k_ranges)):
        if q1 <= q0 or k1 <= k0:
            continue
        qs = rearrange(q[q0:q1], "l n d -> n l d")
        ks = rearrange(k[k0:k1], "l g d -> g l d")
        vs = rearrange(v[k0:k1], "l g d -> g l d")
        if flash_rounding:
            o = _flash_rounded(qs, ks, vs)
        else:
            o = F.scaled_dot_product_attention(qs, ks, vs, enable_gqa=gqa)  # [N, l, D]
        out[q0:q1] = rearrange(o, "n l d -> l n d")
    return out


def _flash_rounded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [N, l, D], k/v [G, m, D] -> [N, l, D] in q's dtype, with the flash kernels' rounding.

    Query rows are independent, so they are processed in blocks that keep the float32 score
    matrix within SCORE_BUDGET elements.
    """
    n, rows, d = q.shape
    g, keys, _ = k.shape
    # Query heads sharing a K/V head are stacked along the rows: [G, rep*l, D].
    qg = rearrange(q, "(g r) l d -> g (r l) d", g=g).float()
    kt, vf = k.float().transpose(1, 2), v.float()
    step = max(1, SCORE_BUDGET // (g * keys))
    blocks = []
    for start in range(0, qg.shape[1], step):
        scores = qg[:, start : start + step] @ kt * (1.0 / math.sqrt(d))  # [G, b, m] float32
        p = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
        blocks.append((p.to(q.dtype).float() @ vf) / p.sum(dim=-1, keepdim=True))
    o = torch.cat(blocks, dim=1)
    return rearrange(o, "g (r l) d -> (g r) l d", l=rows).to(q.dtype)
