"""Exact DiT memory and FLOPs of a run without a GPU or weights: ``python -m magi.plan``.

The DiT of a config is built on fake tensors (no memory, no init, no checkpoint read) and the
real denoise loop (``magi.sampling.denoise``) walks the whole chunk plan of the video. Each DiT
call of a new shape runs the real model code on fake tensors under a live-bytes tracker and
torch's FLOP counter; calls of a shape already seen reuse its numbers, so the 24B model plans in
seconds. Small control tensors (times, caption masks, key ranges) stay real, so the model's
data-dependent steps (caption packing, range lists) run as they do on a GPU.

What is simulated: DiT weights (fp8 swap included), the activation peak of the largest DiT call
(every temporary the model allocates, K/V history copies included), FLOPs of every pass of every
step. What is arithmetic: the KV cache (max cached chunks x layers x K/V row bytes), T5 (the
T5-v1.1-XXL encoder in float32 when ``t5_device`` is a GPU), context parallelism (activations and
FLOPs divided by cp_size). Not counted: the VAE decode (reported as not simulated), caption
tensors copied to the device (< 0.1 GiB), CUDA context and allocator slack.

Attention runs through ``magi.attention`` with a planning backend that calls the fused SDPA kernel
per query segment (no score matrix), like the flash / flex kernels on a GPU.

Legend: L tokens, N query heads, G K/V heads, D head dim, c tokens per chunk.
"""

from __future__ import annotations

import argparse
import json
import sys
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from magi.attention.masks import Ranges, range_pairs
from magi.config import MagiConfig, load_config

GIB = 2**30
PLAN_BACKEND = "plan"
# Dense bf16 tensor peaks (TFLOP/s, no sparsity) and memory (GiB) from NVIDIA datasheets.
GPUS = {"H100": (989.0, 80), "H200": (989.0, 141), "A100": (312.0, 80), "L40S": (362.0, 48),
        "RTX4090": (165.0, 24), "RTX3090": (71.0, 24), "A10G": (70.0, 24)}  # fmt: skip
T5_XXL = {"d_model": 4096, "d_ff": 10240, "layers": 24, "heads": 64, "d_kv": 64, "vocab": 32128}


@dataclass(frozen=True)
class Plan:
    """Per-GPU memory and FLOPs of one run (bytes, FLOPs; see the module docstring)."""

    num_frames: int
    video_size_h: int
    video_size_w: int
    fp8: bool
    kv_offload: bool
    t5_on_gpu: bool
    cp_size: int
    window_size: int
    chunks: int
    dit_passes: int
    weights_bytes: int
    kv_cache_device_bytes: int
    kv_cache_host_bytes: int
    activation_peak_bytes: int
    t5_peak_bytes: int
    peak_bytes: int  # weights + device KV + max(activation, T5) on one GPU
    flops_per_window_step: int  # the costliest sampler step, all its passes, per GPU
    flops_total: int  # every pass of the video, per GPU
    gpu_memory_bytes: int | None = None
    fits: bool | None = None

    def seconds_at(self, peak_tflops: float) -> float:
        """Lower bound on DiT time per video at a dense peak (TFLOP/s per GPU)."""
        return self.flops_total / (peak_tflops * 1e12)


# ---- the two measuring devices ----------------------------------------------------------------
class LiveBytes(TorchDispatchMode):
    """Tracks bytes of tensor storages created while active and alive; ``peak`` is their maximum.

    Storages reachable from an op's inputs (weights, views of them) are not new. Works on real
    and fake tensors alike: each new storage gets a weakref finalizer that subtracts its bytes.
    """

    def __init__(self) -> None:
        super().__init__()
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
        if key in known or key in self._held:
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


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_ranges: Ranges,
              k_ranges: Ranges) -> torch.Tensor:  # fmt: skip
    """Planning backend (``magi.attention`` contract): PyTorch's fused CPU flash kernel per query
    segment and K/V head, so real and fake runs allocate what a GPU flash kernel does (the output
    and its row statistics, no score matrix, no K/V copies per query head). Works on real CPU
    tensors too (the 5 % check of the simulation). q [L, N, D], k/v [L, G, D]."""
    out = torch.zeros_like(q)
    rep = q.shape[1] // k.shape[1]
    kernel = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    for (q0, q1), (k0, k1) in zip(range_pairs(q_ranges), range_pairs(k_ranges)):
        if q1 <= q0 or k1 <= k0:
            continue
        for g in range(k.shape[1]):
            qs = q[q0:q1, g * rep : (g + 1) * rep].transpose(0, 1)[None]  # [1, rep, l, D]
            ks = k[k0:k1, g][None, None].expand(1, rep, k1 - k0, k.shape[2])  # [1, rep, m, D]
            vs = v[k0:k1, g][None, None].expand(1, rep, k1 - k0, v.shape[2])
            out[q0:q1, g * rep : (g + 1) * rep] = kernel(qs, ks, vs)[0][0].transpose(0, 1)
    return out


def _sdpa_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    """QK^T and PV of one fused attention call: 2·b·h·l·m·(D + Dv)."""
    b, h, lq, d = q_shape
    return 2 * b * h * lq * k_shape[2] * (d + v_shape[3])


FLOP_RULES = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}


# ---- the simulated run -------------------------------------------------------------------------
class _PlanCache:
    """KV cache stand-in: reads give fake rows of the right shape (the copy to the device is an
    activation); writes keep nothing (the cache's size is arithmetic, ``_kv_bytes``)."""

    def __init__(self, max_chunks: int, template: torch.Tensor, heads: int, head_dim: int) -> None:
        self.max_chunks, self.offload = max_chunks, False
        self._template, self._heads, self._head_dim = template, heads, head_dim
        self._chunk_tokens = 0

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


class _FakeDiT(nn.Module):
    """The DiT on fake tensors; each new call shape is measured once (peak bytes, FLOPs)."""

    def __init__(self, dit: nn.Module, fake_mode, chunk_tokens: int, num_layers: int) -> None:
        super().__init__()
        self.dit, self.config, self.fake_mode = dit, dit.config, fake_mode
        self.chunk_tokens = chunk_tokens
        self.missing_layers = num_layers - len(dit.videodit_blocks.layers)  # all alike: counted as the last
        self.seen: dict[tuple, tuple[int, int]] = {}  # call shape -> (peak bytes, FLOPs)
        self.step_flops = 0
        self.passes = 0

    def forward(self, x, t, y, y_mask, text_dropped, kv_range, slice_point=0, kv_cache=None,
                cache_write_chunks=0, distill_step=None):  # fmt: skip
        key = (tuple(x.shape), tuple(t.shape), tuple(y.shape), int(y_mask.sum()),
               tuple(map(tuple, (torch.as_tensor(kv_range) - slice_point * self.chunk_tokens).tolist())),
               cache_write_chunks, distill_step is None)  # fmt: skip
        if key not in self.seen:
            xf = self.fake_mode.from_tensor(x)
            marks: list[int] = []
            with FlopCounterMode(display=False, custom_mapping=FLOP_RULES) as flops, LiveBytes() as live:
                count = lambda *_: marks.append(flops.get_total_flops())
                last = self.dit.videodit_blocks.layers[-1]
                hooks = [last.register_forward_pre_hook(count), last.register_forward_hook(count)]
                try:
                    self.dit(xf, t, y, y_mask, text_dropped, kv_range, slice_point, kv_cache,
                             cache_write_chunks, distill_step)  # fmt: skip
                finally:
                    for h in hooks:
                        h.remove()
            layer = marks[1] - marks[0]
            total = flops.get_total_flops() + self.missing_layers * layer
            self.seen[key] = (live.peak, total)
        self.step_flops += self.seen[key][1]
        self.passes += 1
        return torch.zeros(x.shape[0], x.shape[1], *x.shape[2:])


def _weights_bytes(cfg: MagiConfig) -> int:
    """Bytes of the DiT's parameters and buffers as loaded (meta build, fp8 swap, promotion)."""
    from magi.fp8 import swap_fp8_linears
    from magi.models.dit import DiT

    with torch.device("meta"):
        dit = DiT(cfg.model)
        if cfg.engine.fp8_quant:
            swap_fp8_linears(dit, cfg.model.num_layers)
        dit.promote_precision()
    return sum(p.nbytes for p in dit.parameters()) + sum(b.nbytes for b in dit.buffers())


def _promote(dit: nn.Module) -> None:
    """``DiT.promote_precision`` for fake parameters (``Module.float`` cannot swap them in place)."""
    for module in dit.promoted_modules():
        for sub in module.modules():
            for name, p in sub._parameters.items():
                if p is not None and p.is_floating_point():
                    sub._parameters[name] = nn.Parameter(p.float(), requires_grad=False)
            for name, b in sub._buffers.items():
                if b is not None and b.is_floating_point():
                    sub._buffers[name] = b.float()


@dataclass(frozen=True)
class Simulation:
    """What ``simulate`` measured for one config on one GPU (no cp, settings as configured)."""

    weights_bytes: int
    activation_peak_bytes: int
    flops_per_window_step: int
    flops_total: int
    passes: int
    chunks: int
    max_cached_chunks: int
    chunk_tokens: int


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


def _fake_model(cfg: MagiConfig) -> tuple[_FakeDiT, torch.Tensor]:
    """The DiT of cfg on fake tensors, wrapped for measuring, and a fake K/V dtype template.

    Layers 0 (never fp8) and 1 (fp8 when quantised) stand for all: every layer has the same
    shapes, so the activation peak is theirs and the FLOPs of the others are the last one's.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from magi.fp8 import swap_fp8_linears
    from magi.models.dit import DiT

    m, rt = cfg.model, cfg.runtime
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    with fake_mode:
        dit = DiT(m, layer_numbers=list(range(min(m.num_layers, 2))))
        if cfg.engine.fp8_quant:
            swap_fp8_linears(dit, m.num_layers)
        _promote(dit)
        template = torch.empty(0, dtype=m.dtype)
    c = (
        rt.chunk_width
        // m.t_patch_size
        * (rt.video_size_h // 8 // m.patch_size)
        * (rt.video_size_w // 8 // m.patch_size)
    )
    return _FakeDiT(dit, fake_mode, c, m.num_layers), template


def simulate(cfg: MagiConfig) -> Simulation:
    """Build the DiT on fake tensors and run the whole denoise loop of cfg's video through it."""
    from magi.budget import chunk_count
    from magi.sampling.denoise import SamplerSettings, denoise

    m, rt = cfg.model, cfg.runtime
    model, template = _fake_model(cfg)
    settings = SamplerSettings.from_config(cfg, prev_chunks_scale_value=0.7)
    plan = settings.plan(chunk_count("t2v", rt.num_frames, 0, rt.chunk_width))
    cache = _PlanCache(plan.max_cached_chunks(), template, m.num_query_groups, m.kv_channels)
    channels = m.in_channels // 2 if m.half_channel_vae else m.in_channels
    shape = (1, channels, rt.chunk_width, rt.video_size_h // 8, rt.video_size_w // 8)
    per_step: list[int] = []

    def close_step(step) -> None:
        per_step.append(model.step_flops)
        model.step_flops = 0

    caps = FullCaptions(m.caption_max_length, m.caption_channels)
    with planning_attention():
        for _ in denoise(model, plan, settings, caps, lambda k: torch.zeros(shape), cache, callback=close_step):
            pass
    peak = max(p for p, _ in model.seen.values())
    return Simulation(_weights_bytes(cfg), peak, max(per_step), sum(per_step), model.passes, plan.chunk_num,
                plan.max_cached_chunks(), model.chunk_tokens)  # fmt: skip


# ---- the public estimate -----------------------------------------------------------------------
def t5_bytes(on_gpu: bool) -> int:
    """T5-v1.1-XXL encoder weights in float32 (the official numerics) when it runs on the GPU."""
    if not on_gpu:
        return 0
    d, f, n, h, dk, vocab = (T5_XXL[k] for k in ("d_model", "d_ff", "layers", "heads", "d_kv", "vocab"))
    per_layer = 4 * d * h * dk + 3 * d * f + 2 * d  # q k v o, gated FFN, 2 RMSNorms
    return 4 * (n * per_layer + vocab * d + d)


def estimate(cfg: MagiConfig, *, num_frames: int | None = None, video_size_h: int | None = None,
             video_size_w: int | None = None, fp8: bool | None = None, kv_offload: bool | None = None,
             t5_on_gpu: bool | None = None, cp_size: int | None = None,
             gpu_memory_bytes: int | None = None) -> Plan:  # fmt: skip
    """Per-GPU memory and FLOPs of cfg's run; None keeps the config's value.

    Args:
        cfg: the run's config (model, runtime and engine sections).
        num_frames, video_size_h, video_size_w: the video.
        fp8: the fp8 linear swap (engine.fp8_quant). kv_offload: KV cache in host memory.
        t5_on_gpu: T5 on the GPU (runtime.t5_device). cp_size: context-parallel GPUs.
        gpu_memory_bytes: one GPU's memory; sets ``fits``.
    """
    cfg = with_video(cfg, num_frames, video_size_h, video_size_w)
    en = replace(cfg.engine, fp8_quant=cfg.engine.fp8_quant if fp8 is None else fp8)
    cfg = replace(cfg, engine=en)
    run = simulate(cfg)
    return assemble(cfg, run, cfg.runtime, en.fp8_quant, en.kv_offload if kv_offload is None else kv_offload,
                     t5_on_gpu_of(cfg) if t5_on_gpu is None else t5_on_gpu, cp_size or en.cp_size,
                     gpu_memory_bytes)  # fmt: skip


def t5_on_gpu_of(cfg: MagiConfig) -> bool:
    return torch.device(cfg.runtime.t5_device).type != "cpu"


def assemble(cfg: MagiConfig, run: Simulation, rt, fp8: bool, kv_offload: bool, t5_on_gpu: bool, cp: int,
             gpu_memory_bytes: int | None) -> Plan:  # fmt: skip
    """The per-GPU plan of a simulation under settings that need no new simulation (KV place,
    T5 place, cp size: activations, KV rows and FLOPs split evenly over cp GPUs)."""
    m = cfg.model
    kv = run.max_cached_chunks * m.num_layers * run.chunk_tokens * m.num_query_groups * 2 * m.kv_channels
    kv = kv * m.dtype.itemsize // cp
    device_kv, host_kv = (0, kv) if kv_offload else (kv, 0)
    act, t5 = -(-run.activation_peak_bytes // cp), t5_bytes(t5_on_gpu)
    peak = run.weights_bytes + device_kv + max(act, t5)
    fits = None if gpu_memory_bytes is None else peak <= gpu_memory_bytes
    return Plan(rt.num_frames, rt.video_size_h, rt.video_size_w, fp8, kv_offload, t5_on_gpu, cp,
                rt.window_size, run.chunks, run.passes, run.weights_bytes, device_kv, host_kv, act, t5,
                peak, run.flops_per_window_step // cp, run.flops_total // cp, gpu_memory_bytes, fits)  # fmt: skip


def options(cfg: MagiConfig, gpu_memory_bytes: int, *, max_cp: int | None = None, **video) -> list[Plan]:
    """Every setting combination (fp8 as configured, KV offload, T5 place, cp size up to max_cp),
    fastest first: least DiT time per GPU, then device-resident KV, then T5 on the GPU."""
    en = cfg.engine
    cps = [c for c in (1, 2, 4, 8) if c <= (max_cp or max(en.cp_size, 1)) and cfg.model.num_attention_heads % c == 0]
    cfg = with_video(cfg, **video)
    run, rt = simulate(cfg), cfg.runtime
    plans = [assemble(cfg, run, rt, en.fp8_quant, off, t5, cp, gpu_memory_bytes)
             for cp in cps for off in (False, True) for t5 in (True, False)]  # fmt: skip
    return sorted(plans, key=lambda p: (p.flops_total, p.kv_offload, not p.t5_on_gpu))


def with_video(cfg: MagiConfig, num_frames: int | None = None, video_size_h: int | None = None,
               video_size_w: int | None = None) -> MagiConfig:  # fmt: skip
    """cfg with the video's frames and size replaced (None keeps the config's)."""
    rt = cfg.runtime
    rt = replace(rt, num_frames=num_frames or rt.num_frames, video_size_h=video_size_h or rt.video_size_h,
                 video_size_w=video_size_w or rt.video_size_w)  # fmt: skip
    return replace(cfg, runtime=rt)


def check_fits(cfg: MagiConfig, device_memory_bytes: int, **video) -> Plan:
    """Refuse a run whose DiT cannot fit one GPU of device_memory_bytes, naming settings that would.

    Args:
        cfg: the run's config (its engine / runtime settings are the ones checked).
        device_memory_bytes: one GPU's memory (``torch.cuda.get_device_properties(i).total_memory``).
        video: num_frames / video_size_h / video_size_w overrides.

    Returns:
        The plan of the configured settings (it fits).

    Raises:
        ValueError: one line with the need, the memory and the fastest settings that fit.
    """
    plans = options(cfg, device_memory_bytes, max_cp=8, **video)
    mine = configured(cfg, plans)
    if mine.fits:
        return mine
    good = [p for p in plans if p.fits]
    fix = f"try {describe(good[0])}" if good else "no cp / offload setting fits: lower the video size or use fp8"
    raise ValueError(f"this run needs {mine.peak_bytes / GIB:.1f} GiB per GPU but the GPU has "
                     f"{device_memory_bytes / GIB:.1f} GiB; {fix} (magi.plan.check_fits)")  # fmt: skip


def configured(cfg: MagiConfig, plans: list[Plan]) -> Plan:
    """The plan among ``options`` that has cfg's own cp size, KV place and T5 place."""
    en = cfg.engine
    return next(p for p in plans if p.cp_size == en.cp_size and p.kv_offload == en.kv_offload
                and p.t5_on_gpu == t5_on_gpu_of(cfg))  # fmt: skip


def describe(p: Plan) -> str:
    """The settings of a plan as config fields."""
    t5 = "cuda" if p.t5_on_gpu else "cpu"
    return (
        f"cp_size {p.cp_size}, kv_offload {str(p.kv_offload).lower()}, t5_device {t5}, fp8_quant {str(p.fp8).lower()}"
    )


def pass_cost(cfg: MagiConfig, chunks: int, history_chunks: int = 0, caption_tokens: int | None = None
              ) -> tuple[int, int]:  # fmt: skip
    """(activation peak bytes, FLOPs) of one DiT pass over ``chunks`` chunks of cfg's video size
    that all see ``history_chunks`` cached chunks and themselves (block-causal), B = 1."""
    m, rt = cfg.model, cfg.runtime
    model, template = _fake_model(cfg)
    c, sp = model.chunk_tokens, history_chunks
    cache = _PlanCache(max(1, sp), template, m.num_query_groups, m.kv_channels)
    cache.write(0, 0, template, c)
    channels = m.in_channels // 2 if m.half_channel_vae else m.in_channels
    x = torch.zeros(1, channels, chunks * rt.chunk_width, rt.video_size_h // 8, rt.video_size_w // 8)
    y, mask = torch.zeros(chunks, m.caption_max_length, m.caption_channels), torch.zeros(chunks, m.caption_max_length)
    mask[:, : m.caption_max_length if caption_tokens is None else caption_tokens] = 1
    kv = torch.tensor([[0, (sp + j + 1) * c] for j in range(chunks)])
    with planning_attention():
        model(x, torch.full((1, chunks), 0.5), y, mask, torch.tensor([False]), kv, sp, cache)
    return next(iter(model.seen.values()))


# ---- the command line --------------------------------------------------------------------------
def _bytes(text: str) -> int:
    units = {"gib": GIB, "gb": 10**9, "mib": 2**20, "mb": 10**6, "": 1}
    low = text.strip().lower()
    for unit in sorted(units, key=len, reverse=True):
        if low.endswith(unit):
            try:
                return int(float(low[: len(low) - len(unit)]) * units[unit])
            except ValueError:
                break
    raise argparse.ArgumentTypeError(f"--gpu_mem {text!r} is not a size; write e.g. 24GiB or 80GB")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m magi.plan", description=__doc__.splitlines()[0])
    p.add_argument("--config_file", required=True)
    p.add_argument("--num_frames", type=int)
    p.add_argument("--video_size_h", type=int)
    p.add_argument("--video_size_w", type=int)
    p.add_argument("--gpu_mem", type=_bytes, help="one GPU's memory, e.g. 24GiB")
    p.add_argument("--gpu", choices=sorted(GPUS), help="a GPU by name (memory and peak FLOP/s)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def _report(plan: Plan, peak_tflops: float, best: Plan | None) -> str:
    g = lambda n: f"{n / GIB:.2f} GiB"
    lines = [
        (f"video {plan.num_frames} frames {plan.video_size_h}x{plan.video_size_w}, {plan.chunks} chunks, "
         f"{plan.dit_passes} DiT passes; {describe(plan)}"),
        (f"per GPU: weights {g(plan.weights_bytes)}, KV cache {g(plan.kv_cache_device_bytes)} on device "
         f"+ {g(plan.kv_cache_host_bytes)} in host memory, activation peak {g(plan.activation_peak_bytes)}, "
         f"T5 {g(plan.t5_peak_bytes)}, VAE decode not simulated"),
        f"peak {g(plan.peak_bytes)}" + ("" if plan.gpu_memory_bytes is None else
                                       f" of {g(plan.gpu_memory_bytes)}: {'fits' if plan.fits else 'does NOT fit'}"),
        (f"FLOPs per window step {plan.flops_per_window_step / 1e15:.3f} PFLOP, per video "
         f"{plan.flops_total / 1e15:.2f} PFLOP; floor {plan.seconds_at(peak_tflops):.1f} s at {peak_tflops:.0f} TFLOP/s"),
    ]  # fmt: skip
    if best is not None:
        lines.append(f"fastest setting that fits: {describe(best)} (peak {g(best.peak_bytes)})")
    elif plan.gpu_memory_bytes is not None:
        lines.append("no cp / offload / T5 setting fits this GPU: lower the video size")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    cfg = load_config(args.config_file)
    peak_tflops, mem = GPUS[args.gpu or "H100"]
    memory = args.gpu_mem or (int(mem * GIB) if args.gpu else None)
    video = {"num_frames": args.num_frames, "video_size_h": args.video_size_h, "video_size_w": args.video_size_w}
    best = None
    if memory is None:
        plan = estimate(cfg, **video)
    else:
        plans = options(cfg, memory, max_cp=8, **video)
        plan, best = configured(cfg, plans), next((p for p in plans if p.fits), None)
    if args.json:
        out = asdict(plan) | {"fastest_fitting": None if best is None else asdict(best)}
        print(json.dumps(out))
    else:
        print(_report(plan, peak_tflops, best))
    return 0


if __name__ == "__main__":
    sys.exit(main())
