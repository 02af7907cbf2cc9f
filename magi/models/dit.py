"""The MAGI-1 DiT ("videodit_ardf"): single-device, plain PyTorch.

Parameter names and shapes are the official checkpoint keys (shared/spec/dit.md §1), so a
checkpoint loads without renaming. One ``forward`` call is one official DiT *pass*; the sampler
runs the 1 (distill) or 3 (CFG) passes of a step and builds their kv ranges.

Seams for parallelism applied from outside (magi/distributed/, never copied from here):

* ``DiT.embed(...) -> (hidden [S, B, D], DiTContext)``: everything per call that the layers
  read: RoPE cos/sin per token, the per-chunk condition and the per-token ``condition_map``, the
  packed caption tokens and cross-attention ranges, the self-attention ranges and cache info.
* ``for layer in model.videodit_blocks.layers: hidden = layer(hidden, ctx)``.
* ``DiT.head(hidden, ctx) -> velocity``: final norm, final linear, unpatchify.
* ``layer.self_attention.core_attention`` (``SelfAttentionCore``, no parameters) takes q/k/v of
  the local heads for the full sequence, does the KV-cache read/write and calls
  ``magi.attention.attention``. A Ulysses wrapper all-to-alls around it; the cache then holds only
  the local K/V heads. Token-indexed context fields (rope, condition_map) are sequence-first, so a
  context-parallel rank slices them with the hidden states.

Precision follows the official map (dit.md §10): embedders, RoPE, q/k norms, post-norms and the
head in float32, the residual stream and the big matmuls in ``params_dtype``. ``DiT(cfg)``
allocates the official construction dtypes; ``promote_precision()`` casts the promoted modules to
float32 as the official loader does. The forward computes in the right precision either way.

Compile-clean: given ``host_call_args`` (kv_range pairs, caption counts: host ints), ``forward``
reads nothing back from the device and traces as one ``torch.compile`` graph per window shape.

Legend: B batch, C channels, T latent frames, H W latent size, R chunks per call, S tokens,
N heads, G K/V groups, D width / head dim, Lcap caption slots, Ccap caption width.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from magi.attention import attention
from magi.attention.masks import Pairs, Ranges, chunk_query_pairs, cross_attention_pairs, range_pairs
from magi.config import ModelConfig
from magi.models.kv_cache import KVCache

FREQ_EMBED_DIM = 256  # width of the timestep sinusoid
TIME_SCALE = 1000.0  # timesteps in [0, 1] are scaled to [0, 1000] before the sinusoid
ROPE_REF_TOKENS = 16  # RoPE positions are scaled to a 16x16-patch reference grid
PROJ_GROUPS = 8  # linear_proj input interleaves self/cross in 8 groups (TP-8 training layout)


@dataclass
class DiTContext:
    """Per-call tensors shared by every layer (built by ``DiT.embed``).

    Token-indexed fields are sequence-first (S = tokens of one batch item, time-major raster).
    """

    rope_cos: torch.Tensor  # [S, 3*nb] float32
    rope_sin: torch.Tensor  # [S, 3*nb] float32
    condition: torch.Tensor  # [B*R, Dc] params_dtype, row b*R + j = chunk j of batch b
    condition_map: torch.Tensor  # [S, B] int64 row of `condition` for every token
    y_xattn: torch.Tensor  # [Ntok, Dx] valid caption tokens, packed segment after segment
    caption_counts: tuple[int, ...]  # [B*R] caption tokens per segment
    xattn_q_ranges: Ranges  # B*R pairs over the batch-major "(b s)" query tokens
    xattn_k_ranges: Ranges  # B*R pairs over y_xattn rows
    self_q_ranges: Pairs  # B*R pairs over "(b s)" query tokens
    self_k_ranges: Pairs  # B*R pairs, absolute: [cache rows < slice_point*c ; this call]
    chunk_tokens: int  # c, tokens per chunk
    batch: int  # B
    slice_point: int  # absolute chunk index of the call's first chunk
    kv_cache: KVCache | None
    cache_write_chunks: int


class LayerNorm1p(nn.Module):
    """LayerNorm whose effective weight is (stored weight + 1) ("zero-centred gamma").

    ``compute_dtype`` is the precision the official code runs it in: float32 for the promoted
    norms, params_dtype for the cross-attention q/k norms (their +1 is rounded in that dtype).
    """

    def __init__(self, dim: int, eps: float, one_p: bool, dtype: torch.dtype, compute_dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim, dtype=dtype) if one_p else torch.ones(dim, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(dim, dtype=dtype))
        self.eps, self.one_p, self.compute_dtype = eps, one_p, compute_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(self.compute_dtype)
        w = w + 1 if self.one_p else w
        b = self.bias.to(self.compute_dtype)
        return F.layer_norm(x.to(self.compute_dtype), w.shape, w, b, self.eps)


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> sinusoid(1000 t) (rounded to params_dtype) -> Linear, SiLU, Linear (fp32)."""

    def __init__(self, cfg: ModelConfig, cond_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQ_EMBED_DIM, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))
        self.round_dtype = cfg.dtype

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = FREQ_EMBED_DIM // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half).to(t.device)
        args = t.float()[..., None] * freqs * TIME_SCALE
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(self.round_dtype)
        return self.mlp(emb.to(self.mlp[0].weight.dtype)).float()


class CaptionEmbedder(nn.Module):
    """Caption projections (fp32) and the learned null-caption table.

    Cross-attention sees SiLU(Linear(caption)); the adaLN condition only ever sees row 798
    ("conditional") or 799 ("text dropped") of the null table (dit.md §5.3).
    """

    def __init__(self, cfg: ModelConfig, cond_dim: int, xattn_dim: int) -> None:
        super().__init__()
        shape = (cfg.caption_max_length, cfg.caption_channels)
        # On meta (the load's build; the checkpoint gives the values) arithmetic imports torch._dynamo (~1 s).
        table = torch.empty(shape) if torch.empty(0).is_meta else torch.randn(shape) * 0.02
        self.null_caption_embedding = nn.Parameter(table)
        self.y_proj_xattn = nn.Sequential(nn.Linear(cfg.caption_channels, xattn_dim), nn.SiLU())
        self.y_proj_adaln = nn.Sequential(nn.Linear(cfg.caption_channels, cond_dim))

    def xattn(self, tokens: torch.Tensor) -> torch.Tensor:
        """[Ntok, Ccap] -> [Ntok, Dx] float32."""
        w = self.y_proj_xattn[0].weight
        return self.y_proj_xattn(tokens.to(w.dtype)).float()

    def adaln(self, text_dropped: torch.Tensor) -> torch.Tensor:
        """[B] bool -> [B, Dc] float32 from null-table row -1 (dropped) or -2 (conditional)."""
        table = self.null_caption_embedding
        rows = torch.where(text_dropped[:, None], table[-1], table[-2])
        return self.y_proj_adaln(rows).float()


class LearnedRope3D(nn.Module):
    """3D RoPE over (frame, row, column) with learned frequency bands shared by the three axes."""

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        nb = head_dim // 8
        meta = torch.empty(0).is_meta  # as in CaptionEmbedder: no arithmetic on the meta device
        bands = torch.empty(nb) if meta else 1.0 / 10000.0 ** (torch.arange(nb, dtype=torch.float32) / nb)
        self.bands = nn.Parameter(bands)

    def forward(self, frames: int, hp: int, wp: int, frame_offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [frames*hp*wp, 3*nb] float32 for frames [frame_offset, frame_offset + frames)
        of a video of frame_offset + frames frames (temporal positions are absolute indices)."""
        total = frames + frame_offset
        scale = math.sqrt(hp * wp / ROPE_REF_TOKENS**2)
        dev = self.bands.device
        pos_t = _rope_axis(torch.arange(frame_offset, total, device=dev).float(), total, total)
        pos_h = _rope_axis(torch.arange(hp, device=dev).float() - (hp - 1) / 2, hp, hp / scale)
        pos_w = _rope_axis(torch.arange(wp, device=dev).float() - (wp - 1) / 2, wp, wp / scale)
        grid = torch.stack(torch.meshgrid(pos_t, pos_h, pos_w, indexing="ij"), dim=-1)  # [T, H, W, 3]
        angles = rearrange(grid[..., None] * self.bands.float(), "t h w a k -> (t h w) (a k)")
        return angles.cos(), angles.sin()


def _rope_axis(pos: torch.Tensor, size: int, ref: float) -> torch.Tensor:
    # Rescale positions so the axis spans the reference grid (endpoint aligned); size-1 axes stay.
    return pos if size == 1 else pos / (size - 1) * (ref - 1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Non-interleaved rotary embedding on the first 2*cos.shape[-1] dims of x [..., D]."""
    half = cos.shape[-1]
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


class SelfAttentionCore(nn.Module):
    """Self-attention on q/k/v of the full call: KV-cache read, cache write, range attention.

    Parameter-free, so a context-parallel wrapper can exchange heads around it. q [B*S, N, D],
    k/v [B*S, G, D] (batch-major, all tokens of the call, any subset of heads) -> [B*S, N, D].
    """

    def __init__(self, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: DiTContext) -> torch.Tensor:
        kv = torch.cat([k, v], dim=-1)  # [B*S, G, 2D]: the official cache row layout [K | V]
        history, k_ranges = self.cache_history(kv, ctx)  # read before writing: a write may evict
        if ctx.cache_write_chunks > 0:
            self.cache_write(kv, ctx)
        if history is not None:
            kv = torch.cat([history, kv], dim=0)
        k, v = kv.chunk(2, dim=-1)
        return attention(q, k.contiguous(), v.contiguous(), ctx.self_q_ranges, k_ranges)

    def cache_write(self, kv: torch.Tensor, ctx: DiTContext) -> None:
        """Store the K/V rows of the call's first cache_write_chunks chunks (absolute indices)."""
        rows = kv[: ctx.cache_write_chunks * ctx.chunk_tokens]
        ctx.kv_cache.write(self.layer_index, ctx.slice_point, rows, ctx.chunk_tokens)

    def cache_history(self, kv: torch.Tensor, ctx: DiTContext) -> tuple[torch.Tensor | None, Pairs]:
        """Cached rows of the chunks the kv ranges reach before slice_point (None if none), and
        the kv ranges translated from absolute coordinates to rows of [history ; this call]."""
        c, sp = ctx.chunk_tokens, ctx.slice_point
        if sp == 0:
            return None, ctx.self_k_ranges
        first = min(min(k0 for k0, _ in ctx.self_k_ranges) // c, sp)  # host ints: no device read
        k_ranges = tuple((k0 - first * c, k1 - first * c) for k0, k1 in ctx.self_k_ranges)
        if first == sp:
            return None, k_ranges
        if ctx.kv_cache is None:
            raise ValueError(f"kv_range reaches chunk {first} before slice_point {sp} but no kv_cache was given")
        return ctx.kv_cache.read(self.layer_index, first, sp, kv.device).to(kv.dtype), k_ranges


class QKVProjection(nn.Module):
    """Shared pre-norm and the four query/key/value projections (official ``linear_qkv``)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, dt = cfg.hidden_size, cfg.dtype
        q_dim, kv_dim = cfg.num_attention_heads * cfg.kv_channels, cfg.num_query_groups * cfg.kv_channels
        self.layer_norm = nn.LayerNorm(d, eps=cfg.layernorm_epsilon, dtype=dt)
        self.q = nn.Linear(d, q_dim, bias=False, dtype=dt)
        self.qx = nn.Linear(d, q_dim, bias=False, dtype=dt)
        self.k = nn.Linear(d, kv_dim, bias=False, dtype=dt)
        self.v = nn.Linear(d, kv_dim, bias=False, dtype=dt)


class ParallelAttention(nn.Module):
    """Self- and cross-attention from one pre-norm, projected together (dit.md §6.1-6.6)."""

    def __init__(self, cfg: ModelConfig, layer_index: int) -> None:
        super().__init__()
        dt, hd, one_p, eps = cfg.dtype, cfg.kv_channels, cfg.apply_layernorm_1p, cfg.layernorm_epsilon
        q_dim, kv_dim = cfg.num_attention_heads * hd, cfg.num_query_groups * hd
        self.head_dim = hd
        self.linear_qkv = QKVProjection(cfg)
        xattn_dim = int(cfg.hidden_size * cfg.xattn_cond_hidden_ratio)
        self.linear_kv_xattn = nn.Linear(xattn_dim, 2 * kv_dim, bias=False, dtype=dt)
        self.linear_proj = nn.Linear(2 * q_dim, cfg.hidden_size, bias=False, dtype=dt)
        self.q_layernorm = LayerNorm1p(hd, eps, one_p, dt, torch.float32)
        self.q_layernorm_xattn = LayerNorm1p(hd, eps, one_p, dt, dt)
        self.k_layernorm = LayerNorm1p(hd, eps, one_p, dt, torch.float32)
        self.k_layernorm_xattn = LayerNorm1p(hd, eps, one_p, dt, dt)
        self.core_attention = SelfAttentionCore(layer_index)

    def forward(self, h: torch.Tensor, ctx: DiTContext) -> torch.Tensor:
        """h [S, B, D] -> projected attention output [S, B, D] (float32, or the fp8 GEMM's dtype)."""
        u = self.linear_qkv.layer_norm(h)
        q = self._normed_rope(self.linear_qkv.q(u), self.q_layernorm, ctx)
        k = self._normed_rope(self.linear_qkv.k(u), self.k_layernorm, ctx)
        v = rearrange(self.linear_qkv.v(u), "s b (g d) -> (b s) g d", d=self.head_dim)
        core = self.core_attention(q, k, v, ctx)  # [(b s), N, D]
        cross = self.cross_attention(u, ctx)  # [(b s), N, D]
        return self.project(core, cross, ctx.batch)

    def _normed_rope(self, x: torch.Tensor, norm: LayerNorm1p, ctx: DiTContext) -> torch.Tensor:
        x = rearrange(x, "s b (n d) -> s b n d", d=self.head_dim)
        y = apply_rope(norm(x.float()), ctx.rope_cos[:, None, None], ctx.rope_sin[:, None, None])
        return rearrange(y.to(x.dtype), "s b n d -> (b s) n d")

    def cross_attention(self, u: torch.Tensor, ctx: DiTContext) -> torch.Tensor:
        """Each chunk's queries attend to that chunk's caption tokens. u [S, B, D] -> [(b s), N, D]."""
        qx = rearrange(self.linear_qkv.qx(u), "s b (n d) -> (b s) n d", d=self.head_dim)
        qx = self.q_layernorm_xattn(qx)
        y = ctx.y_xattn.to(self.linear_kv_xattn.weight.dtype)
        kvx = rearrange(self.linear_kv_xattn(y), "l (g two d) -> l g two d", two=2, d=self.head_dim)
        kx = self.k_layernorm_xattn(kvx[:, :, 0])
        return attention(qx, kx, kvx[:, :, 1].contiguous(), ctx.xattn_q_ranges, ctx.xattn_k_ranges)

    def project(self, core: torch.Tensor, cross: torch.Tensor, batch: int) -> torch.Tensor:
        """Interleave [self | cross] in 8 groups, then linear_proj (fp32 for a plain Linear)."""
        a = torch.cat([rearrange(o, "(b s) n d -> s b (n d)", b=batch) for o in (core, cross)], dim=-1)
        a = rearrange(a, "s b (two g f) -> s b (g two f)", two=2, g=PROJ_GROUPS)
        if isinstance(self.linear_proj, nn.Linear):
            return F.linear(a.float(), self.linear_proj.weight.float())
        return self.linear_proj(a)  # a swapped-in module computes in its own precision


class MLP(nn.Module):
    """Pre-norm MLP: SwiGLU (gated_linear_unit) or exact GELU, no biases."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, f, dt = cfg.hidden_size, cfg.ffn_hidden_size, cfg.dtype
        self.gated = cfg.gated_linear_unit
        self.layer_norm = nn.LayerNorm(d, eps=cfg.layernorm_epsilon, dtype=dt)
        self.linear_fc1 = nn.Linear(d, 2 * f if self.gated else f, bias=False, dtype=dt)
        self.linear_fc2 = nn.Linear(f, d, bias=False, dtype=dt)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.linear_fc1(self.layer_norm(h))
        if self.gated:
            gate, up = x.chunk(2, dim=-1)
            x = F.silu(gate) * up
            del gate, up  # views of fc1's output: free it before fc2 (the activation peak)
        else:
            x = F.gelu(x)
        return self.linear_fc2(x)


class AdaModulateLayer(nn.Module):
    """condition -> 2 gates: softcap(Linear(SiLU(condition)), 1), computed in params_dtype."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cond_dim = int(cfg.hidden_size * cfg.cond_hidden_ratio)
        gate_dim = int(cfg.hidden_size * cfg.cond_gating_ratio)
        self.proj = nn.Sequential(nn.Linear(cond_dim, 2 * gate_dim, dtype=cfg.dtype))

    def forward(self, condition: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.proj(F.silu(condition))
        g = torch.tanh(g.float()).to(g.dtype)
        return g.chunk(2, dim=-1)


def gated_residual(
    x: torch.Tensor,
    residual: torch.Tensor,
    gate: torch.Tensor,
    condition_map: torch.Tensor,
    post_norm: nn.Module,
) -> torch.Tensor:
    """residual + postLN(gate[row of token] * x), in float32, returned in residual's dtype."""
    y = x.float() * gate.float()[condition_map]  # [S, B, D] * gathered [S, B, D]
    return (post_norm(y) + residual.float()).to(residual.dtype)


class TransformerLayer(nn.Module):
    """One DiT layer: parallel attention block, gated sandwich norms, MLP (dit.md §6)."""

    def __init__(self, cfg: ModelConfig, layer_index: int, layer_number: int) -> None:
        super().__init__()
        self.layer_number = layer_number  # global index (decides fp8 layers under pipeline parallel)
        eps, one_p, dt = cfg.layernorm_epsilon, cfg.apply_layernorm_1p, cfg.dtype
        self.ada_modulate_layer = AdaModulateLayer(cfg)
        self.self_attention = ParallelAttention(cfg, layer_index)
        self.self_attn_post_norm = LayerNorm1p(cfg.hidden_size, eps, one_p, dt, torch.float32)
        self.mlp = MLP(cfg)
        self.mlp_post_norm = LayerNorm1p(cfg.hidden_size, eps, one_p, dt, torch.float32)

    def forward(self, h: torch.Tensor, ctx: DiTContext) -> torch.Tensor:
        """h [S, B, D] params_dtype -> [S, B, D]."""
        gate_msa, gate_mlp = self.ada_modulate_layer(ctx.condition)
        cmap = ctx.condition_map
        h = gated_residual(self.self_attention(h, ctx), h, gate_msa, cmap, self.self_attn_post_norm)
        return gated_residual(self.mlp(h), h, gate_mlp, cmap, self.mlp_post_norm)


class TransformerBlock(nn.Module):
    """The layer stack and the final norm (official ``videodit_blocks``)."""

    def __init__(self, cfg: ModelConfig, layer_numbers: list[int]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(cfg, i, n) for i, n in enumerate(layer_numbers))
        self.final_layernorm = LayerNorm1p(
            cfg.hidden_size, cfg.layernorm_epsilon, cfg.apply_layernorm_1p, cfg.dtype, torch.float32
        )


class FinalLinear(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        out = cfg.patch_size**2 * cfg.t_patch_size * cfg.out_channels
        self.linear = nn.Linear(cfg.hidden_size, out, bias=False)


class DiT(nn.Module):
    """The MAGI-1 video DiT.

    Args:
        model_config: architecture (official ``model_config`` section).
        layer_numbers: global indices of the layers to build (one pipeline stage); default all.
            Layers are numbered locally 0.. in ``videodit_blocks.layers``.
    """

    def __init__(self, model_config: ModelConfig, layer_numbers: list[int] | None = None) -> None:
        super().__init__()
        cfg = self.config = model_config
        cond_dim = int(cfg.hidden_size * cfg.cond_hidden_ratio)
        xattn_dim = int(cfg.hidden_size * cfg.xattn_cond_hidden_ratio)
        kernel = (cfg.t_patch_size, cfg.patch_size, cfg.patch_size)
        self.x_embedder = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel, stride=kernel, bias=False)
        self.t_embedder = TimestepEmbedder(cfg, cond_dim)
        self.y_embedder = CaptionEmbedder(cfg, cond_dim, xattn_dim)
        self.rope = LearnedRope3D(cfg.kv_channels)
        numbers = list(range(cfg.num_layers)) if layer_numbers is None else list(layer_numbers)
        self.videodit_blocks = TransformerBlock(cfg, numbers)
        self.final_linear = FinalLinear(cfg)
        self.requires_grad_(False)  # inference model: no autograd graph through the layers

    def promoted_modules(self) -> list[nn.Module]:
        """Modules the official code runs in float32 whatever params_dtype is (dit.md §10)."""
        mods: list[nn.Module] = [self.x_embedder, self.t_embedder, self.y_embedder, self.rope]
        mods += [self.videodit_blocks.final_layernorm, self.final_linear]
        for layer in self.videodit_blocks.layers:
            attn = layer.self_attention
            mods += [attn.q_layernorm, attn.k_layernorm, layer.self_attn_post_norm, layer.mlp_post_norm]
        return mods

    def promote_precision(self) -> DiT:
        """Cast the promoted modules to float32, as the official loader does after loading."""
        for module in self.promoted_modules():
            module.float()
        return self

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        y_mask: torch.Tensor,
        text_dropped: torch.Tensor,
        kv_range: Ranges,
        slice_point: int = 0,
        kv_cache: KVCache | None = None,
        cache_write_chunks: int = 0,
        distill_step: float | None = None,
        caption_counts: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """One official DiT pass.

        Args:
            x: [B, C, T, H, W] latents of the call's chunks (T = R * chunk_width, C = 16).
            t: [B, R] per-chunk time, 0 = noise, 1 = clean.
            y: [B*R, Lcap, Ccap] (or [B*R, 1, Lcap, Ccap]) caption features, segment b*R + j.
            y_mask: [B*R, Lcap] (or [B*R, 1, Lcap]) 1 = valid caption token.
            text_dropped: [B] or [1] bool, adaLN null row 799 (True) or 798 (False).
            kv_range: [B*R, 2] int key-token range per chunk over [cached rows of chunks
                < slice_point ; this call's tokens, batch-major]: a tensor (read on the host) or
                Python int pairs (nothing read back: compile-clean).
            slice_point: absolute chunk index of x's first chunk (RoPE time, cache rows).
            kv_cache: cache read for chunks < slice_point and written by cache_write_chunks.
            cache_write_chunks: write K/V of this call's first n chunks at slice_point.. (B == 1).
            distill_step: step size d of distilled models (adds TE(d) to the time embedding).
            caption_counts: valid caption tokens per segment (``y_mask.sum(-1)``) as Python ints;
                None reads them from y_mask on the host. Given, they must match y_mask.

        Returns:
            velocity [B, C, T, H, W] float32.
        """
        h, ctx = self.embed(
            x, t, y, y_mask, text_dropped, kv_range, slice_point, kv_cache, cache_write_chunks, distill_step,
            caption_counts,
        )  # fmt: skip
        for layer in self.videodit_blocks.layers:
            h = layer(h, ctx)
        return self.head(h, ctx, x.shape)

    def embed(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        y_mask: torch.Tensor,
        text_dropped: torch.Tensor,
        kv_range: Ranges,
        slice_point: int = 0,
        kv_cache: KVCache | None = None,
        cache_write_chunks: int = 0,
        distill_step: float | None = None,
        caption_counts: Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, DiTContext]:
        """Patch-embed x and build the per-call context (arguments as in ``forward``).

        Returns:
            hidden [S, B, D] in params_dtype and the ``DiTContext`` every layer reads.
        """
        cfg = self.config
        y, y_mask = _squeeze_caption(y, 3), _squeeze_caption(y_mask, 2)
        b, r = t.shape
        kv_pairs = _check_call(cfg, x, t, y, y_mask, text_dropped, kv_range, kv_cache, cache_write_chunks)
        h = self.patch_embed(x)  # [B, D, T', Hp, Wp] float32
        frames, hp, wp = h.shape[2:]
        chunk_tokens = frames // r * hp * wp
        hidden = rearrange(h, "b d t h w -> (t h w) b d").to(cfg.dtype)
        cos, sin = self.rope(frames, hp, wp, frame_offset=slice_point * (frames // r))
        condition = self.condition(t, text_dropped.to(x.device).bool().reshape(-1), distill_step)
        valid = y_mask.to(y.device) > 0
        counts = _caption_counts(valid, caption_counts)
        y_xattn = self.y_embedder.xattn(_select_captions(y, valid, counts)).to(cfg.dtype)
        xq, xk = cross_attention_pairs(counts, chunk_tokens)
        sq, sk = chunk_query_pairs(len(kv_pairs), chunk_tokens), kv_pairs
        token_chunk = torch.arange(frames * hp * wp, device=x.device) // chunk_tokens  # [S]
        cond_map = token_chunk[:, None] + torch.arange(b, device=x.device)[None] * r  # [S, B]
        ctx = DiTContext(
            cos, sin, condition, cond_map, y_xattn, counts, xq, xk, sq, sk,
            chunk_tokens, b, slice_point, kv_cache, cache_write_chunks,
        )  # fmt: skip
        return hidden, ctx

    def patch_embed(self, x: torch.Tensor) -> torch.Tensor:
        """Latent rescale, optional channel duplication, Conv3d patchify in float32."""
        cfg = self.config
        x = x * cfg.x_rescale_factor
        if cfg.half_channel_vae:
            x = torch.cat([x, x], dim=1)
        w = self.x_embedder.weight
        return F.conv3d(x.float(), w.float(), stride=self.x_embedder.stride)

    def condition(self, t: torch.Tensor, text_dropped: torch.Tensor, distill_step: float | None) -> torch.Tensor:
        """Per-chunk adaLN condition [B*R, Dc] in params_dtype: TE(t) (+ TE(d)) + adaLN(null row)."""
        t_emb = self.t_embedder(t.float())  # [B, R, Dc]
        if distill_step is not None:
            t_emb = t_emb + self.t_embedder(torch.full_like(t, float(distill_step), dtype=torch.float32))
        cond = t_emb + self.y_embedder.adaln(text_dropped)[:, None]  # [B, R, Dc]
        return rearrange(cond, "b r c -> (b r) c").to(self.config.dtype)

    def head(self, h: torch.Tensor, ctx: DiTContext, x_shape: torch.Size) -> torch.Tensor:
        """Final 1p-norm + linear in float32, unpatchify -> velocity [B, C, T, H, W] float32."""
        cfg = self.config
        w = self.final_linear.linear.weight
        out = F.linear(self.videodit_blocks.final_layernorm(h.float()), w.float())  # [S, B, F]
        _, _, frames, height, width = x_shape
        p, pt = cfg.patch_size, cfg.t_patch_size
        v = rearrange(
            out, "(t h w) b (pt ph pw c) -> b c (t pt) (h ph) (w pw)",
            t=frames // pt, h=height // p, w=width // p, pt=pt, ph=p, pw=p,
        )  # fmt: skip
        if cfg.half_channel_vae:
            v = v[:, : cfg.out_channels // 2]
        return v / cfg.x_rescale_factor


def host_call_args(kv_range: Ranges, y_mask: torch.Tensor) -> dict[str, tuple]:
    """{"kv_range": int pairs, "caption_counts": ints} of a call, read once outside any compiled
    region; passed to ``DiT.forward`` in place of the tensors, the forward reads nothing back."""
    mask = _squeeze_caption(y_mask, 2)
    return {"kv_range": range_pairs(kv_range), "caption_counts": tuple((mask > 0).sum(-1).tolist())}


def _caption_counts(valid: torch.Tensor, given: Sequence[int] | None) -> tuple[int, ...]:
    """Valid caption tokens per segment as Python ints (read from the mask when not given)."""
    if given is None:
        return tuple(valid.sum(dim=1).tolist())
    counts = tuple(int(n) for n in given)
    if len(counts) != valid.shape[0] or not all(0 <= n <= valid.shape[1] for n in counts):
        raise ValueError(
            f"caption_counts must give 0..{valid.shape[1]} tokens for each of the {valid.shape[0]} "
            f"segments, got {list(counts)}; use y_mask.sum(-1).tolist()"
        )
    return counts


def _select_captions(y: torch.Tensor, valid: torch.Tensor, counts: tuple[int, ...]) -> torch.Tensor:
    """y[valid] ([Ntok, Ccap], segment after segment) without a data-dependent selection: a
    stable sort puts each segment's valid slots first, then its first counts[i] are gathered."""
    segments, slots = valid.shape
    order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)  # [B*R, Lcap]
    flat = order + torch.arange(segments, device=valid.device)[:, None] * slots
    index = torch.cat([flat[i, :n] for i, n in enumerate(counts)])  # [Ntok]
    return y.reshape(segments * slots, -1).index_select(0, index)


def _squeeze_caption(y: torch.Tensor, dims: int) -> torch.Tensor:
    # The official layout carries a singleton axis: y [B*R, 1, Lcap, Ccap], mask [B*R, 1, Lcap].
    return y[:, 0] if y.dim() == dims + 1 and y.shape[1] == 1 else y


def _check_call(
    cfg: ModelConfig,
    x: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor,
    y_mask: torch.Tensor,
    text_dropped: torch.Tensor,
    kv_range: Ranges,
    kv_cache: KVCache | None,
    cache_write_chunks: int,
) -> Pairs:
    """One-line errors for inputs that would otherwise fail deep inside the layers; returns
    kv_range as int pairs."""
    channels = cfg.in_channels // 2 if cfg.half_channel_vae else cfg.in_channels
    if x.dim() != 5 or x.shape[1] != channels:
        raise ValueError(f"DiT expects x [B, {channels}, T, H, W], got {tuple(x.shape)}")
    b, _, frames, height, width = x.shape
    if t.dim() != 2 or t.shape[0] != b or frames % t.shape[1] != 0:
        raise ValueError(f"t must be [B, R] with B={b} and R dividing T={frames}, got {tuple(t.shape)}")
    if height % cfg.patch_size or width % cfg.patch_size or (frames // t.shape[1]) % cfg.t_patch_size:
        raise ValueError(f"latent size {frames}x{height}x{width} is not divisible by the patch size")
    segments = b * t.shape[1]
    if y.shape[0] != segments or y_mask.shape != y.shape[:2] or y.shape[-1] != cfg.caption_channels:
        raise ValueError(
            f"y must be [B*R={segments}, Lcap, {cfg.caption_channels}] with y_mask [B*R, Lcap], "
            f"got {tuple(y.shape)} and {tuple(y_mask.shape)}"
        )
    if text_dropped.numel() not in (1, b):
        raise ValueError(f"text_dropped must have 1 or B={b} flags, got shape {tuple(text_dropped.shape)}")
    shape = tuple(kv_range.shape) if isinstance(kv_range, torch.Tensor) else (len(kv_range), 2)
    if shape != (segments, 2) or (not isinstance(kv_range, torch.Tensor) and any(len(r) != 2 for r in kv_range)):
        raise ValueError(f"kv_range must be [B*R={segments}, 2] (tensor or int pairs), got {shape}")
    if cache_write_chunks and (kv_cache is None or b != 1):
        raise ValueError("cache_write_chunks needs a kv_cache and batch size 1")
    return range_pairs(kv_range)
