"""Exact memory and FLOPs of a run without a GPU or weights: ``python -m magi.plan``.

The models of a config run on fake tensors (no memory, no init, no checkpoint read;
``magi.fake_run``). The real denoise loop (``magi.sampling.denoise``) walks the whole chunk plan
of the video with a recorder in place of the DiT; then one DiT pass per distinct pass shape (the
one with the most cached history) runs the real model code under a live-bytes tracker and torch's
FLOP counter, and FLOPs of every pass are its shape's measured non-attention FLOPs plus the
attention FLOPs of its key ranges. One chunk's tiled VAE decode (``Engine.decode``'s code) runs on
fake tensors too. Small control tensors (times, caption masks, key ranges) stay real, so the
model's data-dependent steps (caption packing, range lists) run as they do on a GPU.

What is simulated: DiT weights (fp8 swap included), the activation peak of the largest DiT pass
(every temporary the model allocates, K/V history copies included), FLOPs of every pass of every
step, the VAE decode peak of one chunk. fp8 Linears take the GPU path (``torch._scaled_mm``,
``magi.fp8.planning_cuda_path``). What is arithmetic: the VAE's bf16 weights (resident next to the
DiT), the KV cache (max cached chunks x layers x K/V row bytes), T5 (the T5-v1.1-XXL encoder's
float32 weights when ``t5_device`` is a GPU, plus one prompt's encode simulated on fake tensors
with transformers' T5), context
parallelism (activations and FLOPs divided by cp_size). Not counted: caption tensors copied to
the device (< 0.1 GiB), CUDA context and allocator slack.

Attention runs through ``magi.attention`` with a planning backend that calls the fused SDPA kernel
per query segment (no score matrix), like the flash / flex kernels on a GPU.

Legend: L tokens, N query heads, G K/V heads, D head dim, c tokens per chunk.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from magi.config import MagiConfig, load_config
from magi.fake_run import (
    FLOP_RULES,
    Call,
    FullCaptions,
    LiveBytes,
    attention,
    call_attention_flops,
    fake_dit,
    peak_calls,
    planning_attention,
    record_denoise,
    t5_encode_peak,
    vae_decode_peak,
    vae_weights_bytes,
)
from magi.models.vae import CONFIG_NAME, VAEConfig, read_vae_config

__all__ = [
    "FLOP_RULES", "GIB", "GPUS", "FullCaptions", "LiveBytes", "Plan", "Simulation", "assemble", "attention",
    "check_fits", "configured", "describe", "estimate", "options", "pass_cost", "planning_attention", "simulate",
    "t5_bytes", "t5_encode_peak", "t5_on_gpu_of", "vae_config_of", "vae_decode_peak", "with_video",
]  # fmt: skip

GIB = 2**30
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
    vae_weights_bytes: int  # resident on the device next to the DiT (the pipeline's default)
    vae_decode_peak_bytes: int  # one chunk's tiled decode, between DiT passes
    peak_bytes: int  # DiT + VAE weights + device KV + max(activation, VAE decode, T5) on one GPU
    flops_per_window_step: int  # the costliest sampler step, all its passes, per GPU
    flops_total: int  # every pass of the video, per GPU
    gpu_memory_bytes: int | None = None
    fits: bool | None = None

    def seconds_at(self, peak_tflops: float) -> float:
        """Lower bound on DiT time per video at a dense peak (TFLOP/s per GPU)."""
        return self.flops_total / (peak_tflops * 1e12)


# ---- the simulation ----------------------------------------------------------------------------
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
    vae_weights_bytes: int = 0
    vae_decode_peak_bytes: int = 0


def vae_config_of(cfg: MagiConfig) -> VAEConfig:
    """The VAE of cfg's ``vae_pretrained`` folder (its config.json only), else the released VAE."""
    folder = Path(cfg.runtime.vae_pretrained or "")
    if (folder / CONFIG_NAME).is_file():
        return read_vae_config(folder)
    return VAEConfig()


def simulate(cfg: MagiConfig, vae_config: VAEConfig | None = None) -> Simulation:
    """Walk cfg's denoise loop model-free, then run one DiT pass per distinct pass shape (its
    largest-history instance) and one chunk's VAE decode on fake tensors (module docstring)."""
    model = fake_dit(cfg)
    c, layers = model.chunk_tokens, cfg.model.num_layers
    steps, chunks, max_cached = record_denoise(cfg, c)
    peak = max(model.measure(call)[0] for call in peak_calls(steps))
    cost = {call: model.measured[call.body][1] + layers * call_attention_flops(cfg, call, c)
            for step in steps for call in step}  # fmt: skip
    per_step = [sum(cost[call] for call in step) for step in steps]
    vae = vae_config or vae_config_of(cfg)
    return Simulation(_weights_bytes(cfg), peak, max(per_step), sum(per_step), sum(map(len, steps)), chunks,
                      max_cached, c, vae_weights_bytes(vae), vae_decode_peak(cfg, vae))  # fmt: skip


# ---- the public estimate -----------------------------------------------------------------------
def t5_bytes(on_gpu: bool, length: int = 800) -> int:
    """T5-v1.1-XXL encoder on the GPU: its float32 weights (the official numerics) plus the peak of
    one prompt's encode of ``length`` tokens on fake tensors; 0 when T5 runs on the CPU."""
    if not on_gpu:
        return 0
    d, f, n, h, dk, vocab = (T5_XXL[k] for k in ("d_model", "d_ff", "layers", "heads", "d_kv", "vocab"))
    per_layer = 4 * d * h * dk + 3 * d * f + 2 * d  # q k v o, gated FFN, 2 RMSNorms
    return 4 * (n * per_layer + vocab * d + d) + t5_encode_peak(d, f, n, h, dk, vocab, length)


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
    act, t5 = -(-run.activation_peak_bytes // cp), t5_bytes(t5_on_gpu, m.caption_max_length)
    # The VAE decodes each clean chunk between DiT passes (DiT activations freed); T5 encodes
    # new prompts with the DiT and the VAE loaded.
    resident = run.weights_bytes + run.vae_weights_bytes + device_kv
    peak = resident + max(act, run.vae_decode_peak_bytes, t5)
    fits = None if gpu_memory_bytes is None else peak <= gpu_memory_bytes
    return Plan(
        num_frames=rt.num_frames, video_size_h=rt.video_size_h, video_size_w=rt.video_size_w, fp8=fp8,
        kv_offload=kv_offload, t5_on_gpu=t5_on_gpu, cp_size=cp, window_size=rt.window_size, chunks=run.chunks,
        dit_passes=run.passes, weights_bytes=run.weights_bytes, kv_cache_device_bytes=device_kv,
        kv_cache_host_bytes=host_kv, activation_peak_bytes=act, t5_peak_bytes=t5,
        vae_weights_bytes=run.vae_weights_bytes, vae_decode_peak_bytes=run.vae_decode_peak_bytes, peak_bytes=peak,
        flops_per_window_step=run.flops_per_window_step // cp, flops_total=run.flops_total // cp,
        gpu_memory_bytes=gpu_memory_bytes, fits=fits,
    )  # fmt: skip


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
    model = fake_dit(cfg)
    c, sp = model.chunk_tokens, history_chunks
    channels = m.in_channels // 2 if m.half_channel_vae else m.in_channels
    x_shape = (1, channels, chunks * rt.chunk_width, rt.video_size_h // 8, rt.video_size_w // 8)
    caption = m.caption_max_length if caption_tokens is None else caption_tokens
    kv = tuple((-sp * c, (j + 1) * c) for j in range(chunks))
    call = Call(x_shape, (1, chunks), (chunks, m.caption_max_length, m.caption_channels), (caption,) * chunks,
                False, kv, 0)  # fmt: skip
    return model.measure(call)


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
         f"T5 {g(plan.t5_peak_bytes)}, VAE weights {g(plan.vae_weights_bytes)} + decode peak "
         f"{g(plan.vae_decode_peak_bytes)}"),
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
