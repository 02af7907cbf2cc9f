#!/usr/bin/env python
"""Benchmark the MAGI-1 DiT: ms per window step and pass, analytic FLOPs, MFU, peak memory.

The DiT is built at the real 4.5B / 24B shapes with random weights (same FLOPs as the released
model, no checkpoint): layers are created on the meta device and materialised with random
values directly on the target device, so startup takes seconds. The benchmark replays one
steady-state sampler step of a full window (ws chunks in flight, shipped kv ranges) as the sampler
lays it out (shared/spec/sampling.md §5-§7): the step that refreshes the previous chunk's clean
K/V (d = 0, one extra chunk) and a plain step (d > 0, history read from the KV cache). Base
models run three passes per step (text, text-dropped, unconditional), distilled models one pass
(plus the history-free copy of the oldest chunk once it is nearly clean).

FLOPs are counted analytically: 2 x multiply-adds of every Linear / patch-embed over the video
and caption tokens, plus attention 4·Lq·Lk·N·D per segment over the exact block-causal and
cross-attention ranges of the call. Per-chunk conditioning MLPs (timestep, adaLN, gates) are left
out (< 0.01 % of a pass at 720p). MFU = achieved FLOP/s / the device's dense bf16 peak.

Usage:
    python scripts/bench.py                                 # CUDA: 4.5B distill 720x720; CPU: tiny
    python scripts/bench.py --model 24B --variant base --height 720 --width 1280 --layers 12
    python scripts/bench.py --fp8-compare                   # fp8 (_scaled_mm) vs bf16 layers, CUDA
    python scripts/bench.py --offload --kv-offload          # layers + KV cache streamed from host
    python scripts/bench.py --e2e --config example/4.5B/4.5B_distill_config.json
    python scripts/bench.py --floor                         # analytic whole-video FLOPs only
    python scripts/bench.py --memory --model 24B            # analytic memory of every component
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import platform
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from magi.attention import BACKEND_CHOICES, check_backend, resolve_backend  # noqa: E402
from magi.config import ModelConfig, preset  # noqa: E402
from magi.sampling.chunks import ChunkPlan, Step, nearly_clean, step_times  # noqa: E402
from magi.sampling.schedule import distill_step_size, step_intervals, time_schedule  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, TFLOP/s. Matched against
# torch.cuda.get_device_name() in order; --peak overrides.
BF16_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989.0),
    ("H800", 989.0),
    ("A100", 312.0),
)
NULL_CAPTION_TOKENS = 50  # the null caption has 50 valid tokens (spec/text.md)
GIB = 1024**3

# CPU smoke-test model: the tiny reference architecture (like the 4.5B, 3 layers, width 128).
TINY_MODEL = ModelConfig(
    num_layers=3,
    hidden_size=128,
    ffn_hidden_size=512,
    num_attention_heads=4,
    num_query_groups=2,
    kv_channels=32,
    caption_channels=64,
    params_dtype="torch.float32",
)


# ---- analytic FLOPs --------------------------------------------------------------------------
def pass_flops(mc: ModelConfig, chunk_tokens: int, key_lens: list[int], caption_counts: list[int]) -> dict[str, int]:
    """FLOPs of one DiT pass (forward call) over B*R chunk segments.

    Args:
        mc: model architecture.
        chunk_tokens: c, video tokens per chunk segment (queries of every segment).
        key_lens: per segment, self-attention keys it sees (kv_range length, cache included).
        caption_counts: per segment, valid caption tokens (cross-attention keys).

    Returns:
        {"linear", "attention", "total"}: linear = 2·MACs of the patch embed, every per-token
        Linear of every layer, the caption projections and the final linear; attention = QK^T and
        PV of self- and cross-attention, 4·Lq·Lk·N·D per segment and layer.
    """
    d, f, hd = mc.hidden_size, mc.ffn_hidden_size, mc.kv_channels
    q_dim, kv_dim = mc.num_attention_heads * hd, mc.num_query_groups * hd
    dx = int(d * mc.xattn_cond_hidden_ratio)
    patch = mc.t_patch_size * mc.patch_size**2
    tokens, captions = chunk_tokens * len(key_lens), sum(caption_counts)
    fc1_out = 2 * f if mc.gated_linear_unit else f
    per_token_layer = 2 * d * q_dim + 2 * d * kv_dim + 2 * q_dim * d + d * fc1_out + f * d
    per_caption_layer = dx * 2 * kv_dim  # linear_kv_xattn
    macs = mc.num_layers * (tokens * per_token_layer + captions * per_caption_layer)
    macs += tokens * (mc.in_channels * patch * d + d * patch * mc.out_channels)
    macs += captions * mc.caption_channels * dx  # y_proj_xattn over the valid caption tokens
    pairs = chunk_tokens * (sum(key_lens) + captions)  # query-key pairs, self + cross
    attn = mc.num_layers * 4 * pairs * q_dim
    return {"linear": 2 * macs, "attention": attn, "total": 2 * macs + attn}


# ---- the passes of one sampler step ------------------------------------------------------------
@dataclass(frozen=True)
class PassSpec:
    """One DiT forward of a step. Segment i = batch item i // R, chunk i % R.

    Attributes:
        name: "text" / "prev" / "uncond" (3-pass CFG) or "distill".
        batch: B.
        chunks: absolute chunk index of each of the R call chunks (of one batch item).
        times: [B][R] chunk times.
        kv_chunks: per segment, visible keys [lo, hi) in chunk units (official kv_range / c).
        captions: per segment, valid caption tokens.
        text_dropped: adaLN null row 799 (True) or 798.
        slice_point: absolute chunk index of the call's first chunk (0 without history).
        cache_write_chunks: chunks whose K/V this pass writes (the clean refresh).
    """

    name: str
    batch: int
    chunks: tuple[int, ...]
    times: tuple[tuple[float, ...], ...]
    kv_chunks: tuple[tuple[int, int], ...]
    captions: tuple[int, ...]
    text_dropped: bool
    slice_point: int
    cache_write_chunks: int


def step_passes(
    plan: ChunkPlan,
    step: Step,
    ts: torch.Tensor,
    *,
    distill: bool,
    clean_t: float,
    threshold: float,
    caption_tokens: int,
) -> list[PassSpec]:
    """The DiT passes the sampler runs for ``step`` (spec/sampling.md §5-§7)."""
    times = tuple(float(t) for t in step_times(step, ts, clean_t))
    extra = step.extra is not None
    prompt = tuple(NULL_CAPTION_TOKENS if extra and j == 0 else caption_tokens for j in range(len(times)))
    write = 1 if extra else 0
    sp = step.slice_point
    if distill:
        chunks, kv, caps, tt = step.call_chunks, step.kv_ranges, prompt, times
        if nearly_clean(step, ts, threshold):  # history-free copy of the oldest denoising chunk
            slot = sp + len(chunks)
            chunks, kv = (*chunks, step.chunks[0]), (*kv, (slot, slot + 1))
            caps, tt = (*caps, caption_tokens), (*tt, times[1 if extra else 0])
        return [PassSpec("distill", 1, chunks, (tt,), kv, caps, False, sp, write)]
    nulls = (NULL_CAPTION_TOKENS,) * len(times)
    text = PassSpec("text", 1, step.call_chunks, (times,), step.kv_ranges, prompt, False, sp, 0)
    prev = PassSpec("prev", 1, step.call_chunks, (times,), step.kv_ranges, nulls, True, sp, write)
    denoising = times[1:] if extra else times
    alone = tuple((b, b + 1) for b in range(len(denoising)))
    uncond = PassSpec(
        "uncond",
        len(denoising),
        (0,),
        tuple((t,) for t in denoising),
        alone,
        (NULL_CAPTION_TOKENS,) * len(denoising),
        True,
        0,
        0,
    )
    return [text, prev, uncond]


def window_steps(runtime: dict, distill: bool, caption_tokens: int) -> dict[str, list[PassSpec]]:
    """Passes of the two steady-state steps of a full window: "refresh" (d = 0) and "plain" (d = 1)."""
    ws, n = runtime["window_size"], runtime["num_steps"]
    plan = ChunkPlan(
        chunk_num=ws + 1,
        num_steps=n,
        window_size=ws,
        chunk_width=runtime["chunk_width"],
        noise2clean_kvrange=tuple(runtime["noise2clean_kvrange"]),
        clean_chunk_kvrange=runtime["clean_chunk_kvrange"],
    )
    ts = time_schedule(n, runtime["shortcut_mode"])
    found: dict[str, list[PassSpec]] = {}
    for step in plan.steps():
        if step.iteration == ws and step.inner <= 1:  # window a..a+ws-1 with a = 1: full
            kind = "refresh" if step.inner == 0 else "plain"
            found[kind] = step_passes(
                plan,
                step,
                ts,
                distill=distill,
                clean_t=runtime["clean_t"],
                threshold=runtime["threshold"],
                caption_tokens=caption_tokens,
            )
    if "plain" not in found:
        raise ValueError(f"num_steps {n} / window_size {ws} leaves no step with d > 0 to time")
    return found


def spec_flops(mc: ModelConfig, spec: PassSpec, chunk_tokens: int) -> dict[str, int]:
    """pass_flops of one PassSpec (chunk-unit key ranges turned into key counts)."""
    key_lens = [(hi - lo) * chunk_tokens for lo, hi in spec.kv_chunks]
    return pass_flops(mc, chunk_tokens, key_lens, list(spec.captions))


def video_floor(
    mc: ModelConfig, runtime: dict, distill: bool, chunk_tokens: int, chunk_num: int, caption_tokens: int
) -> dict[str, float]:
    """FLOPs of every DiT pass of a whole t2v video in the official pass layout (magi's sampler
    skips zero-weight CFG passes of base models, scripts/count_passes.py; distill is the same)."""
    plan = ChunkPlan(
        chunk_num=chunk_num,
        num_steps=runtime["num_steps"],
        window_size=runtime["window_size"],
        chunk_width=runtime["chunk_width"],
        noise2clean_kvrange=tuple(runtime["noise2clean_kvrange"]),
        clean_chunk_kvrange=runtime["clean_chunk_kvrange"],
    )
    ts = time_schedule(runtime["num_steps"], runtime["shortcut_mode"])
    total = {"linear": 0, "attention": 0, "total": 0}
    passes = tokens = 0
    for step in plan.steps():
        for spec in step_passes(
            plan,
            step,
            ts,
            distill=distill,
            clean_t=runtime["clean_t"],
            threshold=runtime["threshold"],
            caption_tokens=caption_tokens,
        ):
            passes += 1
            tokens += len(spec.kv_chunks) * chunk_tokens
            for key, value in spec_flops(mc, spec, chunk_tokens).items():
                total[key] += value
    return {**total, "steps": plan.total_steps, "passes": passes, "token_passes": tokens}


# ---- model and inputs ----------------------------------------------------------------------------
def build_random_dit(mc: ModelConfig, device: torch.device, *, layers: int | None, fp8: bool, seed: int = 0):
    """DiT with random weights: built on the meta device, materialised on ``device``."""
    from magi.models.dit import DiT

    numbers = list(range(layers if layers is not None else mc.num_layers))
    with torch.device("meta"):
        model = DiT(mc, layer_numbers=numbers)
        if fp8:
            from magi.fp8 import swap_fp8_linears

            swap_fp8_linears(model, mc.num_layers)
    model = model.to_empty(device=device).promote_precision().eval().requires_grad_(False)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        _randomise(name, tensor, gen)
    return model


def _randomise(name: str, t: torch.Tensor, gen: torch.Generator) -> None:
    """Values that keep activations finite and O(1): the timing does not depend on them."""
    if t.dtype == torch.float8_e4m3fn:
        t.copy_(torch.randn(t.shape, generator=gen, device=t.device).clamp(-4, 4).to(t.dtype))
    elif name.endswith(("weight_scale", "input_scale", "smooth_scale")):
        t.fill_(0.02 if name.endswith("weight_scale") else 1.0)
    elif t.dim() >= 2:
        t.normal_(0.0, t.shape[-1] ** -0.5 if t.dim() == 2 else 0.02, generator=gen)
    elif name.endswith("rope.bands"):
        t.copy_(1.0 / 10000 ** (torch.arange(t.numel(), device=t.device) / t.numel()))
    elif name.endswith("layer_norm.weight"):  # the two plain LayerNorms (no "+1")
        t.fill_(1.0)
    else:
        t.uniform_(-0.05, 0.05, generator=gen)


def pass_inputs(
    mc: ModelConfig,
    spec: PassSpec,
    latent_hw: tuple[int, int],
    chunk_width: int,
    device: torch.device,
    distill_step: float | None,
    kv_cache,
    chunk_tokens: int,
) -> dict:
    """Random DiT inputs with the pass's exact shapes, times, caption counts and kv ranges."""
    r, b = len(spec.chunks), spec.batch
    channels = mc.in_channels // 2 if mc.half_channel_vae else mc.in_channels
    h, w = latent_hw
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(b, channels, r * chunk_width, h, w, device=device, generator=gen)
    y = torch.randn(b * r, mc.caption_max_length, mc.caption_channels, device=device, generator=gen)
    counts = torch.tensor(spec.captions)
    y_mask = (torch.arange(mc.caption_max_length)[None] < counts[:, None]).to(device, torch.int64)
    # kv ranges: absolute chunks -> tokens; passes without history are batch-major from 0
    kv_range = torch.tensor(spec.kv_chunks, dtype=torch.int64) * chunk_tokens
    return dict(
        x=x,
        t=torch.tensor(spec.times, device=device),
        y=y,
        y_mask=y_mask,
        text_dropped=torch.tensor([spec.text_dropped] * b, device=device),
        kv_range=kv_range,
        slice_point=spec.slice_point,
        kv_cache=kv_cache if spec.slice_point > 0 or spec.cache_write_chunks else None,
        cache_write_chunks=spec.cache_write_chunks,
        distill_step=distill_step,
    )


# ---- timing --------------------------------------------------------------------------------------
def timed_ms(fn: Callable[[], object], device: torch.device, iters: int, warmup: int) -> list[float]:
    """Wall time of fn() per call in ms (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def device_peak(device: torch.device, override: float | None) -> tuple[float | None, str]:
    """bf16 dense peak TFLOP/s of the device and where the number comes from."""
    if override is not None:
        return override, "--peak"
    if device.type != "cuda":
        return None, "unknown for CPU (pass --peak)"
    name = torch.cuda.get_device_name(device)
    for key, peak in BF16_PEAK_TFLOPS:
        if key in name:
            return peak, f"datasheet dense bf16 ({key})"
    return None, f"unknown device {name!r} (pass --peak)"


def memory_stats(device: torch.device) -> dict[str, float | None]:
    peak_gpu = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB -> GiB (Linux)
    return {"peak_gpu_memory_gib": peak_gpu, "peak_host_rss_gib": rss}


# ---- modes ---------------------------------------------------------------------------------------
def model_setup(args: argparse.Namespace) -> tuple[ModelConfig, dict, bool]:
    """(architecture, sampler values, distill) for --model / --variant (the shipped config's)."""
    cfg = preset(f"{'4.5B' if args.model == 'tiny' else args.model}_{args.variant}")
    rt, en = cfg.runtime, cfg.engine
    runtime = {
        "num_steps": 8 if args.model == "tiny" else rt.num_steps,
        "shortcut_mode": en.shortcut_mode,
        "window_size": rt.window_size,
        "chunk_width": rt.chunk_width,
        "noise2clean_kvrange": list(rt.noise2clean_kvrange),
        "clean_chunk_kvrange": rt.clean_chunk_kvrange,
        "clean_t": rt.clean_t,
        "threshold": en.distill_nearly_clean_chunk_threshold,
    }
    if args.num_steps is not None:
        runtime["num_steps"] = args.num_steps
    mc = TINY_MODEL if args.model == "tiny" else cfg.model
    if args.dtype is not None:
        mc = replace(mc, params_dtype=f"torch.{args.dtype}")
    return mc, runtime, args.variant != "base"


def bench_window(args: argparse.Namespace, device: torch.device) -> dict:
    """Time the refresh and plain steps of a full window; FLOPs, MFU and memory."""
    from magi import attention
    from magi.models.kv_cache import KVCache

    mc, runtime, distill = model_setup(args)
    backend = check_backend(args.attention, device, mc.dtype)  # the library's "auto" rule
    attention.set_backend(backend)
    latent_hw = (args.height // 8, args.width // 8)
    chunk_tokens = runtime["chunk_width"] * (latent_hw[0] // mc.patch_size) * (latent_hw[1] // mc.patch_size)
    layers = args.layers or mc.num_layers
    bench_mc = replace(mc, num_layers=layers)  # FLOPs of the layers actually built
    t0 = time.perf_counter()
    # with --offload the layers are built in host memory and streamed to the device per pass
    model = build_random_dit(mc, torch.device("cpu") if args.offload else device, layers=layers, fp8=args.fp8)
    if args.offload:
        from magi.offload import offload_blocks

        offload_blocks(model, device)
    if args.compile:
        from magi.compile import compile_blocks

        compile_blocks(model)
    build_s = time.perf_counter() - t0
    steps = window_steps(runtime, distill, args.caption_tokens)
    n = runtime["num_steps"]
    intervals = step_intervals(n, runtime["shortcut_mode"])
    cache = KVCache(max_chunks=runtime["window_size"], offload=args.kv_offload)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    results = {}
    for inner, kind in enumerate(("refresh", "plain")):  # refresh first: writes what plain reads
        dstep = distill_step_size(n, intervals[inner]) if distill else None
        passes = []
        for spec in steps[kind]:
            inputs = pass_inputs(mc, spec, latent_hw, runtime["chunk_width"], device, dstep, cache, chunk_tokens)
            with torch.inference_mode():
                ms = timed_ms(lambda inputs=inputs: model(**inputs), device, args.iters, args.warmup)
            flops = spec_flops(bench_mc, spec, chunk_tokens)
            passes.append(_pass_report(spec, chunk_tokens, flops, ms))
        results[kind] = passes
    peak, peak_source = device_peak(device, args.peak)
    report = {
        "mode": "window",
        **_header(args, device, mc, layers, backend),
        "resolution": [args.height, args.width],
        "latent_hw": list(latent_hw),
        "tokens_per_chunk": chunk_tokens,
        "num_steps": n,
        "build_seconds": build_s,
        "passes": results,
        **memory_stats(device),
    }
    report.update(_summary(results, peak, peak_source, mc.num_layers / layers))
    return report


def _pass_report(spec: PassSpec, chunk_tokens: int, flops: dict[str, int], ms: list[float]) -> dict:
    median = sorted(ms)[len(ms) // 2]
    return {
        "name": spec.name,
        "batch": spec.batch,
        "chunks": len(spec.chunks),
        "tokens": len(spec.kv_chunks) * chunk_tokens,
        "kv_range_chunks": [list(r) for r in spec.kv_chunks],
        "caption_tokens": list(spec.captions),
        "ms": median,
        "ms_all": ms,
        "flops": flops,
        "tflops_per_s": flops["total"] / median / 1e9,
    }


def _summary(results: dict, peak: float | None, peak_source: str, layer_scale: float) -> dict:
    """Per step / per pass figures; full-depth estimates when only some layers were built."""
    out: dict = {"peak_tflops": peak, "peak_source": peak_source}
    for kind, passes in results.items():
        ms = sum(p["ms"] for p in passes)
        flops = sum(p["flops"]["total"] for p in passes)
        out[f"{kind}_step"] = {
            "passes": len(passes),
            "ms_per_step": ms,
            "ms_per_pass": ms / len(passes),
            "ms_per_step_full_depth": ms * layer_scale,
            "flops_per_step": flops,
            "tflops_per_s": flops / ms / 1e9,
            "mfu": flops / ms / 1e9 / peak if peak else None,
        }
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return f"{platform.processor() or platform.machine()} CPU"


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _header(args: argparse.Namespace, device: torch.device, mc: ModelConfig, layers: int, backend: str) -> dict:
    return {
        "date": _now(),
        "device": device.type,
        "device_name": device_name(device),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "model": args.model,
        "variant": args.variant,
        "layers_built": layers,
        "num_layers": mc.num_layers,
        "params_dtype": mc.params_dtype,
        "fp8": args.fp8,
        "compile": args.compile,
        "offload_blocks": args.offload,
        "kv_offload": args.kv_offload,
        "attention_backend": backend,
    }


def bench_fp8_compare(args: argparse.Namespace, device: torch.device) -> dict:
    """The same window step with bf16 layers and with fp8 (_scaled_mm) layers."""
    if device.type != "cuda":
        return {
            "mode": "fp8_compare",
            "skipped": "fp8 comparison needs a CUDA GPU with fp8 tensor "
            "cores (sm89+); on CPU magi.fp8 falls back to float32 emulation, not a speed path",
        }
    runs = {}
    for fp8 in (False, True):
        sub = argparse.Namespace(**{**vars(args), "fp8": fp8})
        report = bench_window(sub, device)
        runs["fp8" if fp8 else "bf16"] = {k: report[k] for k in ("refresh_step", "plain_step", "peak_gpu_memory_gib")}
        torch.cuda.empty_cache()
    speedup = runs["bf16"]["plain_step"]["ms_per_step"] / runs["fp8"]["plain_step"]["ms_per_step"]
    return {
        "mode": "fp8_compare",
        **runs,
        "plain_step_speedup": speedup,
        "note": "layer 0 and the last layer stay bf16 (official rule); MFU is against the bf16 peak",
    }


def bench_floor(args: argparse.Namespace) -> dict:
    """Analytic whole-video FLOPs and the time they take at the device peak (no model run)."""
    mc, runtime, distill = model_setup(args)
    hp, wp = args.height // 8 // mc.patch_size, args.width // 8 // mc.patch_size
    chunk_tokens = runtime["chunk_width"] * hp * wp
    chunk_num = math.ceil(args.num_frames // 4 / runtime["chunk_width"])
    floor = video_floor(mc, runtime, distill, chunk_tokens, chunk_num, args.caption_tokens)
    peak = args.peak or dict(BF16_PEAK_TFLOPS)["H100"]
    return {
        "mode": "floor",
        "model": args.model,
        "variant": args.variant,
        "resolution": [args.height, args.width],
        "num_frames": args.num_frames,
        "chunks": chunk_num,
        "num_steps": runtime["num_steps"],
        "tokens_per_chunk": chunk_tokens,
        **floor,
        "peak_tflops": peak,
        "seconds_at_peak": floor["total"] / peak / 1e12,
        "seconds_per_chunk_at_peak": floor["total"] / peak / 1e12 / chunk_num,
    }


def _tensor_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def _meta_params(build: Callable[[], torch.nn.Module]) -> tuple[int, int]:
    """(parameter count, bytes as built) of a module constructed on the meta device."""
    with torch.device("meta"):
        module = build()
    return sum(p.numel() for p in module.parameters()), _tensor_bytes(module)


def bench_memory(args: argparse.Namespace) -> dict:
    """Analytic memory of each component from parameter counts (meta-device builds, no weights)."""
    from magi.models.dit import DiT

    mc, runtime, _ = model_setup(args)
    with torch.device("meta"):
        dit = DiT(mc)
        if args.fp8:
            from magi.fp8 import swap_fp8_linears

            swap_fp8_linears(dit, mc.num_layers)
    dit.promote_precision()  # run-time dtypes: promoted modules in float32
    layers = dit.videodit_blocks.layers
    layer_bytes = [_tensor_bytes(layer) for layer in layers]
    rest = _tensor_bytes(dit) - sum(layer_bytes)
    c = runtime["chunk_width"] * (args.height // 8 // mc.patch_size) * (args.width // 8 // mc.patch_size)
    kv_elem = torch.empty((), dtype=mc.dtype).element_size()
    kv_chunk = mc.num_layers * c * mc.num_query_groups * 2 * mc.kv_channels * kv_elem
    plan = ChunkPlan(
        chunk_num=16,
        num_steps=runtime["num_steps"],
        window_size=runtime["window_size"],
        chunk_width=runtime["chunk_width"],
        noise2clean_kvrange=tuple(runtime["noise2clean_kvrange"]),
        clean_chunk_kvrange=runtime["clean_chunk_kvrange"],
    )
    cached = plan.max_cached_chunks()
    t5_params, _ = _meta_params(_t5_xxl_encoder)
    vae_params, vae_fp32 = _meta_params(_released_vae)
    biggest_call = (runtime["window_size"] + 2) * c  # extra clean chunk + window + nearly-clean copy
    # MLP of the largest call: fc1 output and the activation output live together (lower bound
    # of the activation peak; attention, norms and the fp32 linear_proj output come on top)
    mlp_width = mc.ffn_hidden_size * (3 if mc.gated_linear_unit else 2)
    gib = lambda n: n / GIB  # noqa: E731
    return {
        "mode": "memory",
        "model": args.model,
        "variant": args.variant,
        "fp8": args.fp8,
        "resolution": [args.height, args.width],
        "tokens_per_chunk": c,
        "source": "computed from parameter counts",
        "dit_params": sum(p.numel() for p in dit.parameters()),
        "dit_weights_gib": gib(_tensor_bytes(dit)),
        "dit_layer_gib_max": gib(max(layer_bytes)),
        "dit_non_layer_gib": gib(rest),
        "dit_streamed_resident_gib": gib(rest + 2 * max(layer_bytes)),
        "kv_cache_per_chunk_gib": gib(kv_chunk),
        "kv_cache_chunks_kept": cached,
        "kv_cache_gib": gib(kv_chunk * cached),
        "t5_params": t5_params,
        "t5_fp32_gib": gib(4 * t5_params),
        "t5_bf16_gib": gib(2 * t5_params),
        "vae_params": vae_params,
        "vae_bf16_gib": gib(vae_fp32 / 2),
        "largest_call_tokens": biggest_call,
        "mlp_activations_gib": gib(biggest_call * mlp_width * kv_elem),
    }


def _t5_xxl_encoder() -> torch.nn.Module:
    """T5-v1.1-XXL encoder architecture (the text encoder MAGI-1 uses)."""
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(
        vocab_size=32128,
        d_model=4096,
        d_kv=64,
        d_ff=10240,
        num_layers=24,
        num_heads=64,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
    )
    return T5EncoderModel(cfg)


def _released_vae() -> torch.nn.Module:
    from magi.models.vae import VAEConfig, ViTVAE

    return ViTVAE(VAEConfig())


def bench_e2e(args: argparse.Namespace, device: torch.device) -> dict:
    """End-to-end t2v through MagiPipeline: time to first chunk, seconds per chunk, peak memory.

    The clock starts when ``stream`` is called, so the time to first chunk includes encoding the
    prompt (T5), the first window's denoising and the first VAE decode; model loading is reported
    apart. With --offload the DiT is loaded into host memory and its layers streamed
    (``magi.offload``); --kv-offload keeps the KV cache on the host.
    """
    try:
        from magi.pipeline import MagiPipeline
    except ImportError as err:
        raise SystemExit(f"--e2e needs magi.pipeline.MagiPipeline ({err})") from None
    if args.config is None:
        raise SystemExit("--e2e needs --config <official config json> whose checkpoint paths exist")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    pipe = _e2e_pipeline(MagiPipeline, args, device)
    load_s = time.perf_counter() - t0
    stamps, frames, t1 = [], 0, time.perf_counter()
    for chunk in pipe.stream("t2v", args.prompt, num_frames=args.num_frames):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stamps.append(time.perf_counter() - t1)
        frames += len(chunk.frames)
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    cfg = pipe.config
    return {
        "mode": "e2e",
        "config": args.config,
        "device": device.type,
        "device_name": device_name(device),
        "date": _now(),
        "torch": torch.__version__,
        "resolution": [cfg.runtime.video_size_h, cfg.runtime.video_size_w],
        "num_steps": cfg.runtime.num_steps,
        "num_frames": args.num_frames,
        "frames_written": frames,
        "offload_blocks": args.offload,
        "kv_offload": cfg.engine.kv_offload,
        "compile": args.compile,
        "attention_backend": resolve_backend(args.attention, device, cfg.model.dtype),
        "load_seconds": load_s,
        "chunks": len(stamps),
        "time_to_first_chunk_s": stamps[0] if stamps else None,
        "seconds_per_chunk": sum(gaps) / len(gaps) if gaps else None,
        "total_seconds": stamps[-1] if stamps else None,
        **memory_stats(device),
    }


def _e2e_pipeline(pipeline_cls: type, args: argparse.Namespace, device: torch.device):
    """The pipeline of --config with the memory / speed options of the command line."""
    from magi.config import load_config

    cfg = load_config(args.config)
    if args.kv_offload:
        cfg = cfg.replace(engine=replace(cfg.engine, kv_offload=True))
    return pipeline_cls.from_config(
        cfg, device=device, attention_backend=args.attention, offload_blocks=args.offload, compile=args.compile
    )


# ---- CLI -----------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("tiny", "4.5B", "24B"), help="default: 4.5B on CUDA, tiny on CPU")
    p.add_argument("--variant", choices=("base", "distill", "distill_quant"), default="distill")
    p.add_argument("--height", type=int, help="video height (default 720; 64 for tiny)")
    p.add_argument("--width", type=int, help="video width (default 720; 64 for tiny)")
    p.add_argument("--num-steps", type=int, help="override num_steps (window structure only)")
    p.add_argument("--num-frames", type=int, default=96, help="video length for --floor and --e2e")
    p.add_argument("--caption-tokens", type=int, default=64, help="valid prompt tokens per chunk")
    p.add_argument("--layers", type=int, help="build only the first N layers (ms scaled to full depth)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), help="override params_dtype")
    p.add_argument("--attention", default="auto", choices=BACKEND_CHOICES)
    p.add_argument("--fp8", action="store_true", help="fp8 layers (magi.fp8) instead of bf16")
    p.add_argument("--compile", action="store_true", help="torch.compile each layer (magi.compile)")
    p.add_argument("--offload", action="store_true", help="stream DiT layers from host memory (magi.offload)")
    p.add_argument("--kv-offload", action="store_true", help="keep the KV cache in host memory")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--peak", type=float, help="peak TFLOP/s for MFU (default: table by GPU name)")
    p.add_argument("--device", help="default: cuda if available else cpu")
    p.add_argument("--json", type=Path, help="also write the JSON report here")
    p.add_argument("--fp8-compare", action="store_true", help="bf16 vs fp8 window step (CUDA)")
    p.add_argument("--floor", action="store_true", help="analytic whole-video FLOPs only")
    p.add_argument("--memory", action="store_true", help="analytic memory of every component")
    p.add_argument("--e2e", action="store_true", help="end-to-end t2v via MagiPipeline")
    p.add_argument("--config", help="official config JSON for --e2e")
    p.add_argument("--prompt", default="A dog running on the beach at sunset.")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.model = args.model or ("4.5B" if device.type == "cuda" else "tiny")
    default_size = 64 if args.model == "tiny" else 720
    args.height, args.width = args.height or default_size, args.width or default_size
    if args.height % 16 or args.width % 16:
        p.error(f"--height/--width must be multiples of 16 (DiT patching), got {args.height}x{args.width}")
    if args.variant == "distill_quant":
        args.fp8 = True
    args.device = str(device)
    return args


def print_table(report: dict) -> None:
    """Human-readable summary of a report (the JSON carries everything)."""
    if report["mode"] != "window":
        for key, value in report.items():
            if not isinstance(value, (dict, list)):
                print(f"{key:>28}: {value}")
        return
    print(
        f"{report['model']} {report['variant']} {report['resolution'][0]}x{report['resolution'][1]} "
        f"on {report['device_name']} ({report['attention_backend']}, {report['params_dtype']}"
        f"{', fp8' if report['fp8'] else ''}), {report['layers_built']}/{report['num_layers']} layers"
    )
    print(f"{'step':>8} {'pass':>7} {'tokens':>8} {'ms':>10} {'TFLOP':>10} {'TFLOP/s':>9}")
    for kind in ("refresh", "plain"):
        for p in report["passes"][kind]:
            print(
                f"{kind:>8} {p['name']:>7} {p['tokens']:>8} {p['ms']:>10.2f} "
                f"{p['flops']['total'] / 1e12:>10.3f} {p['tflops_per_s']:>9.2f}"
            )
    for kind in ("refresh", "plain"):
        s = report[f"{kind}_step"]
        mfu = f"{100 * s['mfu']:.1f}%" if s["mfu"] is not None else "n/a (no peak)"
        print(f"{kind} step: {s['ms_per_step']:.2f} ms ({s['ms_per_pass']:.2f} ms/pass), MFU {mfu}")
    mem = report["peak_gpu_memory_gib"]
    print(f"peak GPU memory: {f'{mem:.2f} GiB' if mem is not None else 'n/a (CPU)'}")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.floor:
        report = bench_floor(args)
    elif args.memory:
        report = bench_memory(args)
    elif args.e2e:
        report = bench_e2e(args, device)
    elif args.fp8_compare:
        report = bench_fp8_compare(args, device)
    else:
        report = bench_window(args, device)
    print(json.dumps(report, indent=1, default=str))
    print_table(report)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1, default=str))
    return report


if __name__ == "__main__":
    main()
