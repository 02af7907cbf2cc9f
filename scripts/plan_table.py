"""Print the docs/PERFORMANCE.md plan table: per-GPU memory and the FLOP floor of the released
models (4.5B / 24B; base, distill, distill_quant (fp8); 480p and 720p; 1 and 8 GPUs), from
``magi.plan`` (fake tensors, no GPU, no weights); "plan CPU s" is the CPU time of ``simulate``.

    python scripts/plan_table.py [--num_frames 96] [--models 4.5B,24B]
"""

from __future__ import annotations

import argparse
import time

from magi.config import load_config
from magi.plan import GIB, GPUS, assemble, simulate, t5_on_gpu_of, with_video

SIZES = {"480p": (480, 832), "720p": (720, 1280)}
VARIANTS = ("base", "distill", "distill_quant")


def rows(model: str, num_frames: int, peak_tflops: float):
    for variant in VARIANTS:
        cfg = load_config(f"example/{model}/{model}_{variant}_config.json")
        for res, (h, w) in SIZES.items():
            video = with_video(cfg, num_frames, h, w)
            start = time.process_time()
            run = simulate(video)
            took = time.process_time() - start
            for gpus in (1, 8):
                en = cfg.engine
                p = assemble(video, run, video.runtime, en.fp8_quant, en.kv_offload, t5_on_gpu_of(cfg), gpus, None)
                yield (model, variant, res, gpus, p, p.flops_total * gpus, took)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num_frames", type=int, default=96)
    ap.add_argument("--models", default="4.5B,24B")
    args = ap.parse_args()
    peak = GPUS["H100"][0]
    print(
        f"| model | variant | size | GPUs | weights | VAE | KV host | activation | VAE decode | T5 | peak / GPU | "
        f"PFLOP / video | floor s at {peak:.0f} TFLOP/s | plan CPU s |"
    )
    print("|" + "---|" * 14)
    for model in args.models.split(","):
        for name, variant, res, gpus, p, flops, took in rows(model, args.num_frames, peak):
            g = lambda n: f"{n / GIB:.2f}"
            print(
                f"| {name} | {variant} | {res} {p.video_size_h}x{p.video_size_w} | {gpus} | {g(p.weights_bytes)} | "
                f"{g(p.vae_weights_bytes)} | {g(p.kv_cache_host_bytes)} | {g(p.activation_peak_bytes)} | "
                f"{g(p.vae_decode_peak_bytes)} | {g(p.t5_peak_bytes)} | "
                f"{g(p.peak_bytes)} | {flops / 1e15:.1f} | {p.seconds_at(peak):.1f} | {took:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
