"""The models run on fake tensors for ``magi.plan``: the live-bytes tracker, the planning attention
backend, the DiT's denoise loop recorded without the model, and the measured DiT / VAE calls.

A denoise run is planned in two parts. First the real loop (``magi.sampling.denoise``) walks the
whole chunk plan with a ``CallRecorder`` in place of the DiT: it runs no model, only records each
pass's shapes, key ranges and caption counts (cheap: the window latents are the only real
tensors). Then one DiT pass per distinct body shape (call latents, times, captions, distill step)
runs the real model code on fake tensors under the live-bytes tracker and torch's FLOP counter:
the pass of that shape with the most cached history, so the activation peak is the largest of its
shape. FLOPs of every recorded pass = the measured non-attention FLOPs of its shape + the
attention FLOPs of its ranges (2·l·m·(D + Dv) per query head, l query and m key tokens per
segment: exact, the formula the planning backend counts).

Legend: L tokens, N query heads, G K/V heads, D head dim, c tokens per chunk, R chunks per call.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from magi.attention.masks import Ranges, range_pairs
from magi.config import MagiConfig

PLAN_BACKEND = "plan"


# ---- the two measuring devices ----------------------------------------------------------------
class LiveBytes(TorchDispatchMode):
    """Tracks bytes of tensor storages created while active and alive; ``peak`` is their maximum.

    Storages reachable from an op's inputs (weights, views of them) are not new. Works on real
    and fake tensors alike: each new storage gets a weakref finalizer that subtracts its bytes.
    With ``device_type`` only storages on that kind of device count.
    """

    def __init__(self, device_type: str | None = None) -> None:
        super().__init__()
        self.device_type = device_type
        self.live = 0
        self.peak = 0
        self._held: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        known = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if _has_storage(t)}
        for t in tree_leaves(out):
            if _has_storage(t):
                self._track(t.untyped_storage(), known)
        return out

    def _track(self, storage: torch.UntypedStorage, known: set[int]) -> None:
        key = id(storage)
        if key in known or key in self._held or self.device_type not in (None, storage.device.type):
            return
        size = storage.nbytes()
        self._held[key] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.live -= self._held.pop(key, 0)


def _has_storage(t: object) -> bool:
    return isinstance(t, torch.Tensor) and t.layout == torch.strided


@dataclass
class AttentionFlops:
    """FLOPs of the planning backend's attention calls while counting (``counting_attention``)."""

    total: int = 0


_COUNTERS: list[AttentionFlops] = []


@contextmanager
def counting_attention() -> Iterator[AttentionFlops]:
    """Add the FLOPs of every planning-backend attention call made inside to the yielded counter."""
    counter = AttentionFlops()
    _COUNTERS.append(counter)
    try:
        yield counter
    finally:
        _COUNTERS.remove(counter)


def attention_flops(heads: int, head_dim: int, pairs: Sequence[tuple[tuple[int, int], tuple[int, int]]]) -> int:
    """QKᵀ and PV of block attention: 2·l·m·(D + Dv) per query head and (query, key) segment."""
    return sum(2 * heads * (q1 - q0) * (k1 - k0) * 2 * head_dim for (q0, q1), (k0, k1) in pairs if q1 > q0 and k1 > k0)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_ranges: Ranges,
              k_ranges: Ranges) -> torch.Tensor:  # fmt: skip
    """Planning backend (``magi.attention`` contract): PyTorch's fused CPU flash kernel per query
    segment and K/V head, so real and fake runs allocate what a GPU flash kernel does (the output
    and its row statistics, no score matrix, no K/V copies per query head). On fake tensors one
    call, the longest segment's, stands for all (each allocates only its own output, freed before
    the next). Its FLOPs go to the active ``counting_attention`` counters. q [L, N, D], k/v [L, G, D]."""
    pairs = [(a, b) for a, b in zip(range_pairs(q_ranges), range_pairs(k_ranges)) if a[1] > a[0] and b[1] > b[0]]
    for counter in _COUNTERS:
        counter.total += attention_flops(q.shape[1], q.shape[2], pairs)
    out = torch.zeros_like(q)
    groups = range(k.shape[1])
    if isinstance(q, FakeTensor) and pairs:
        pairs = [max(pairs, key=lambda p: (p[0][1] - p[0][0], p[1][1] - p[1][0]))]
        groups = range(1)
    rep = q.shape[1] // k.shape[1]
    kernel = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    for (q0, q1), (k0, k1) in pairs:
        for g in groups:
            qs = q[q0:q1, g * rep : (g + 1) * rep].transpose(0, 1)[None]  # [1, rep, l, D]
            ks = k[k0:k1, g][None, None].expand(1, rep, k1 - k0, k.shape[2])  # [1, rep, m, D]
            vs = v[k0:k1, g][None, None].expand(1, rep, k1 - k0, v.shape[2])
            out[q0:q1, g * rep : (g + 1) * rep] = kernel(qs, ks, vs)[0][0].transpose(0, 1)
    return out


# The fused kernel's FLOPs are counted from the ranges by ``attention`` (on fake tensors it runs
# once for all segments), so the FLOP counter gives it none.
FLOP_RULES = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: lambda *args, **kwargs: 0}


@contextmanager
def planning_attention() -> Iterator[None]:
    """Make this module's ``attention`` the default ``magi.attention`` backend while inside."""
    from magi import attention as attn

    attn.BACKENDS.setdefault(PLAN_BACKEND, __name__)
    before = attn.get_backend()
    attn.set_backend(PLAN_BACKEND)
    try:
        yield
    finally:
        attn.set_backend(before)


# ---- the recorded denoise loop -----------------------------------------------------------------
class PlanCache:
    """KV cache stand-in: reads give fake rows of the right shape (the copy to the device is an
    activation); writes keep nothing (the cache's size is arithmetic in ``magi.plan``)."""

    def __init__(self, max_chunks: int, template: torch.Tensor, heads: int, head_dim: int, chunk_tokens: int) -> None:
        self.max_chunks, self.offload = max_chunks, False
        self._template, self._heads, self._head_dim = template, heads, head_dim
        self._chunk_tokens = chunk_tokens

    def write(self, layer: int, first_chunk: int, kv: torch.Tensor, chunk_tokens: int) -> None:
        self._chunk_tokens = chunk_tokens

    def read(self, layer: int, first_chunk: int, end_chunk: int, device: torch.device) -> torch.Tensor:
        rows = (end_chunk - first_chunk) * self._chunk_tokens
        return self._template.new_empty((rows, self._heads, 2 * self._head_dim))


class FullCaptions:
    """All-valid captions (the cross-attention upper bound), one real table per call width."""

    def __init__(self, length: int, channels: int) -> None:
        self.length, self.channels = length, channels
        self._rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def rows(self, kinds: Sequence[int], chunks: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        r = len(list(chunks))
        if r not in self._rows:
            self._rows[r] = (torch.zeros(r, self.length, self.channels), torch.ones(r, self.length))
        return self._rows[r]


@dataclass(frozen=True)
class Call:
    """One DiT pass as recorded: body (shapes, caption counts, distill), key ranges relative to the
    call's first token (negative = cached history rows), chunks whose K/V it writes."""

    x_shape: tuple[int, ...]
    t_shape: tuple[int, ...]
    y_shape: tuple[int, ...]
    captions: tuple[int, ...]
    distill: bool
    kv: tuple[tuple[int, int], ...]
    write: int

    @property
    def body(self) -> tuple:
        return self.x_shape, self.t_shape, self.y_shape, self.captions, self.distill

    @property
    def history(self) -> int:
        """Cached key rows the pass reads (before its own tokens)."""
        return max(0, -min(k0 for k0, _ in self.kv))


class CallRecorder(nn.Module):
    """Stands for the DiT in the denoise loop: records each pass and returns zero velocity."""

    def __init__(self, config, chunk_tokens: int) -> None:
        super().__init__()
        self.config, self.chunk_tokens = config, chunk_tokens
        self.steps: list[list[Call]] = [[]]

    def forward(self, x, t, y, y_mask, text_dropped, kv_range, slice_point=0, kv_cache=None,
                cache_write_chunks=0, distill_step=None):  # fmt: skip
        first = slice_point * self.chunk_tokens
        kv = tuple((k0 - first, k1 - first) for k0, k1 in range_pairs(kv_range))
        counts = tuple(int(n) for n in (y_mask > 0).reshape(y_mask.shape[0], -1).sum(-1).tolist())
        call = Call(tuple(x.shape), tuple(t.shape), tuple(y.shape), counts, distill_step is not None, kv,
                    cache_write_chunks)  # fmt: skip
        self.steps[-1].append(call)
        return torch.zeros(x.shape)

    def close_step(self, step) -> None:
        self.steps.append([])


def record_denoise(cfg: MagiConfig, chunk_tokens: int) -> tuple[list[list[Call]], int, int]:
    """(passes per sampler step, chunks, max cached chunks) of cfg's t2v video, model-free."""
    from magi.budget import chunk_count
    from magi.sampling.denoise import SamplerSettings, denoise

    m, rt = cfg.model, cfg.runtime
    recorder = CallRecorder(m, chunk_tokens)
    settings = SamplerSettings.from_config(cfg, prev_chunks_scale_value=0.7)
    plan = settings.plan(chunk_count("t2v", rt.num_frames, 0, rt.chunk_width))
    template = torch.empty(0, dtype=m.dtype)
    cache = PlanCache(plan.max_cached_chunks(), template, m.num_query_groups, m.kv_channels, chunk_tokens)
    channels = m.in_channels // 2 if m.half_channel_vae else m.in_channels
    shape = (1, channels, rt.chunk_width, rt.video_size_h // 8, rt.video_size_w // 8)
    caps = FullCaptions(m.caption_max_length, m.caption_channels)
    noise = torch.zeros(shape)
    for _ in denoise(recorder, plan, settings, caps, lambda k: noise, cache, callback=recorder.close_step):
        pass
    return [s for s in recorder.steps if s], plan.chunk_num, plan.max_cached_chunks()


def call_attention_flops(cfg: MagiConfig, call: Call, chunk_tokens: int) -> int:
    """Attention FLOPs of one layer of a pass: each chunk item's c queries over its key range
    (self) and over its valid caption tokens (cross)."""
    m, c = cfg.model, chunk_tokens
    pairs = [((0, c), (k0, k1)) for k0, k1 in call.kv] + [((0, c), (0, n)) for n in call.captions]
    return attention_flops(m.num_attention_heads, m.kv_channels, pairs)


# ---- the measured DiT pass ---------------------------------------------------------------------
@dataclass
class FakeDiT:
    """Layers 0 (never fp8) and 1 (fp8 when quantised) of cfg's DiT on fake tensors: every layer has
    the same shapes, so the activation peak is theirs and the other layers' FLOPs are layer 1's."""

    cfg: MagiConfig
    dit: nn.Module
    fake_mode: FakeTensorMode
    template: torch.Tensor
    chunk_tokens: int
    measured: dict[tuple, tuple[int, int]] = field(default_factory=dict)  # body -> (peak, non-attention FLOPs)

    def measure(self, call: Call) -> tuple[int, int]:
        """(activation peak bytes, FLOPs of the whole model) of one pass; remembers its body's
        non-attention FLOPs."""
        m, c = self.cfg.model, self.chunk_tokens
        hist = -(-call.history // c)  # cached chunks before the call
        kv = torch.tensor([[k0 + hist * c, k1 + hist * c] for k0, k1 in call.kv])
        cache = PlanCache(max(1, hist), self.template, m.num_query_groups, m.kv_channels, c)
        y = torch.zeros(call.y_shape)
        mask = torch.zeros(call.y_shape[:2])
        for j, n in enumerate(call.captions):
            mask[j, :n] = 1
        with self.fake_mode:
            x = torch.empty(call.x_shape)
        args = (x, torch.full(call.t_shape, 0.5), y, mask, torch.tensor([False]), kv, hist, cache, call.write,
                0.25 if call.distill else None)  # fmt: skip
        peak, flops = self._run(args)
        self.measured[call.body] = (peak, flops - m.num_layers * call_attention_flops(self.cfg, call, c))
        return peak, flops

    def _run(self, args: tuple) -> tuple[int, int]:
        from magi import fp8

        marks: list[int] = []
        layers = self.dit.videodit_blocks.layers
        with counting_attention() as attn, planning_attention(), fp8.planning_cuda_path():
            with FlopCounterMode(display=False, custom_mapping=FLOP_RULES) as flops, LiveBytes() as live:
                count = lambda *_: marks.append(flops.get_total_flops() + attn.total)
                hooks = [layers[-1].register_forward_pre_hook(count), layers[-1].register_forward_hook(count)]
                try:
                    self.dit(*args)
                finally:
                    for h in hooks:
                        h.remove()
            missing = self.cfg.model.num_layers - len(layers)  # counted as the last
            return live.peak, flops.get_total_flops() + attn.total + missing * (marks[1] - marks[0])


def fake_dit(cfg: MagiConfig) -> FakeDiT:
    """The DiT of cfg (layers 0 and 1) on fake tensors, promoted and fp8-swapped as loaded."""
    from magi.fp8 import swap_fp8_linears
    from magi.models.dit import DiT

    m, rt = cfg.model, cfg.runtime
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    with fake_mode:
        dit = DiT(m, layer_numbers=list(range(min(m.num_layers, 2))))
        if cfg.engine.fp8_quant:
            swap_fp8_linears(dit, m.num_layers)
        promote_fake(dit)
        template = torch.empty(0, dtype=m.dtype)
    c = (
        rt.chunk_width
        // m.t_patch_size
        * (rt.video_size_h // 8 // m.patch_size)
        * (rt.video_size_w // 8 // m.patch_size)
    )
    return FakeDiT(cfg, dit, fake_mode, template, c)


def promote_fake(dit: nn.Module) -> None:
    """``DiT.promote_precision`` for fake parameters (``Module.float`` cannot swap them in place)."""
    for module in dit.promoted_modules():
        for sub in module.modules():
            for name, p in sub._parameters.items():
                if p is not None and p.is_floating_point():
                    sub._parameters[name] = nn.Parameter(p.float(), requires_grad=False)
            for name, b in sub._buffers.items():
                if b is not None and b.is_floating_point():
                    sub._buffers[name] = b.float()


def peak_calls(steps: list[list[Call]]) -> list[Call]:
    """Per body shape, its pass with the most cached history (then the most K/V written)."""
    best: dict[tuple, Call] = {}
    for call in (call for step in steps for call in step):
        old = best.get(call.body)
        if old is None or (call.history, call.write) > (old.history, old.write):
            best[call.body] = call
    return list(best.values())


# ---- the VAE decode of one chunk --------------------------------------------------------------
class OncePerTileShape:
    """Stands for the VAE in the tiled decode on fake tensors: decodes each tile shape once; a later
    tile of that shape gets an empty result, and the bytes its decode would create on top of what
    is live count towards ``live``'s peak (a decode's allocations depend on its input's shape and
    strides alone)."""

    def __init__(self, vae: nn.Module, live: LiveBytes) -> None:
        self.vae, self.live, self.config = vae, live, vae.config
        self.device, self.dtype = vae.device, vae.dtype
        self._seen: dict[tuple, tuple[int, torch.Size, torch.dtype]] = {}

    def decode(self, z: torch.Tensor, autocast: bool = False) -> torch.Tensor:
        key = (tuple(z.shape), z.stride(), autocast)
        if key not in self._seen:
            with LiveBytes() as own:
                out = self.vae.decode(z, autocast)
            self._seen[key] = (own.peak, out.shape, out.dtype)
            return out
        extra, shape, dtype = self._seen[key]
        self.live.peak = max(self.live.peak, self.live.live + extra)
        return z.new_empty(shape, dtype=dtype)


def vae_decode_peak(cfg: MagiConfig, vae_config, compat: str = "magi") -> int:
    """Peak bytes created by ``Engine.decode`` of one chunk (``magi.media.latents.decode_to_uint8``:
    tiled, bf16 VAE as the pipeline loads it) on fake CPU tensors, the VAE's weights not included.
    The decoder's blocks all have the same shapes and free their temporaries, so two stand for all.
    An upper bound for a GPU: the CPU attention emulation holds float32 score blocks (1024 query
    rows at a time) that the GPU's fused kernel does not (fake CUDA tensors cannot take views in a
    CPU-only torch)."""
    from magi.media.latents import decode_to_uint8
    from magi.models.vae import ViTVAE

    m, rt = cfg.model, cfg.runtime
    small = replace(vae_config, depth=min(vae_config.depth, 2))
    with torch.device("meta"):
        vae = ViTVAE(small).to(torch.bfloat16).eval().requires_grad_(False)
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    with fake_mode:
        vae.to_empty(device="cpu")
        channels = m.in_channels // 2 if m.half_channel_vae else m.in_channels
        latent = torch.empty(1, channels, rt.chunk_width, rt.video_size_h // 8, rt.video_size_w // 8)
    with fake_mode, LiveBytes() as live:
        decode_to_uint8(OncePerTileShape(vae, live), latent, fps=rt.fps, scale_factor=rt.scale_factor, compat=compat)
    return live.peak


def vae_weights_bytes(vae_config) -> int:
    """Bytes of the whole VAE in bf16 (as the pipeline loads it), from a meta build."""
    from magi.models.vae import ViTVAE

    with torch.device("meta"):
        vae = ViTVAE(vae_config).to(torch.bfloat16)
    return sum(p.nbytes for p in vae.parameters()) + sum(b.nbytes for b in vae.buffers())


# ---- the T5 encode of one prompt ---------------------------------------------------------------
@functools.cache
def t5_encode_peak(d_model: int, d_ff: int, layers: int, heads: int, d_kv: int, vocab: int, length: int) -> int:
    """Peak bytes created by one prompt's T5 encode (``T5Encoder.encode``: transformers'
    T5EncoderModel, eager attention, float32, ``length`` tokens) on fake tensors, weights not
    included. Two layers stand for all: layer 0 makes the relative position bias every layer reads,
    and the others have the same shapes."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=vocab, d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=min(layers, 2),
                      num_heads=heads, feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)  # fmt: skip
    config._attn_implementation = "eager"  # as T5Encoder.from_pretrained
    with torch.device("meta"):
        model = T5EncoderModel(config).eval()
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    with fake_mode:
        model.to_empty(device="cpu")
    ids, mask = torch.zeros(1, length, dtype=torch.long), torch.ones(1, length, dtype=torch.long)
    with torch.no_grad(), fake_mode, LiveBytes() as live:
        model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
    return live.peak
