"""Check magi.plan's activation prediction against a real CUDA pass (skips without CUDA).

    python scripts/plan_check_gpu.py --config_file example/4.5B/4.5B_distill_config.json \
        [--chunks 5 --history 0 --backend auto]

Builds layers 0 and 1 of the config's DiT with random weights on the GPU (the plan simulates the
same two layers; every layer has the same shapes), runs one pass of ``--chunks`` chunks seeing
``--history`` cached chunks, and prints the predicted activation peak (``magi.plan.pass_cost``)
next to ``torch.cuda.max_memory_allocated`` above the weights, and the pass time against the
FLOP floor of the two layers' FLOPs.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from magi import attention as attn
from magi.config import load_config
from magi.fp8 import swap_fp8_linears
from magi.models.dit import DiT
from magi.models.kv_cache import KVCache
from magi.plan import GIB, pass_cost


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config_file", required=True)
    ap.add_argument("--chunks", type=int, default=5)
    ap.add_argument("--history", type=int, default=0)
    ap.add_argument("--backend", default="auto")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: skipped (the prediction needs a GPU run to compare with)")
        return 0
    cfg = load_config(args.config_file)
    m, rt = cfg.model, cfg.runtime
    predicted, _ = pass_cost(cfg, args.chunks, args.history)
    dev = torch.device("cuda")
    with torch.device(dev):
        dit = DiT(m, layer_numbers=[0, 1])
        if cfg.engine.fp8_quant:
            swap_fp8_linears(dit, m.num_layers, quantize_weights=True)
    dit = dit.promote_precision().to(dev).eval()
    attn.set_backend(args.backend)
    c = rt.chunk_width * (rt.video_size_h // 16) * (rt.video_size_w // 16)
    channels = m.in_channels // 2 if m.half_channel_vae else m.in_channels
    x = torch.randn(1, channels, args.chunks * rt.chunk_width, rt.video_size_h // 8, rt.video_size_w // 8, device=dev)
    y = torch.randn(args.chunks, m.caption_max_length, m.caption_channels, device=dev)
    mask = torch.ones(args.chunks, m.caption_max_length, device=dev)
    kv = torch.tensor([[0, (args.history + j + 1) * c] for j in range(args.chunks)])
    cache = KVCache(max(1, args.history), offload=cfg.engine.kv_offload)
    rows = torch.zeros(args.history * c, m.num_query_groups, 2 * m.kv_channels, dtype=m.dtype, device=dev)
    for layer in range(2):
        if args.history:
            cache.write(layer, 0, rows, c)
    del rows
    t = torch.full((1, args.chunks), 0.5, device=dev)
    flag = torch.tensor([False], device=dev)
    with torch.no_grad():
        dit(x, t, y, mask, flag, kv, args.history, cache)  # warm-up
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        dit(x, t, y, mask, flag, kv, args.history, cache)
        torch.cuda.synchronize()
        took = time.perf_counter() - start
    measured = torch.cuda.max_memory_allocated() - base
    print(
        f"{torch.cuda.get_device_name()} backend {args.backend}: {args.chunks} chunks x {c} tokens, "
        f"history {args.history}; predicted activation {predicted / GIB:.3f} GiB, measured "
        f"{measured / GIB:.3f} GiB ({measured / predicted - 1:+.1%}); pass of 2 layers {took * 1e3:.1f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
