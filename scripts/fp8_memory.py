#!/usr/bin/env python
"""Activation memory of the fp8 Linears vs bf16, measured on CPU by counting live tensor bytes.

``PeakBytes`` is a TorchDispatchMode that adds up the bytes of every storage allocated by an op run
under it and subtracts them when the last tensor using the storage dies, keeping the maximum: the
peak *extra* memory of the code it wraps (its inputs and parameters are not counted). It runs the
real CPU code paths (e4m3 quantisation, the float32 fallback GEMM), so it measures the same
temporaries a CUDA run would allocate for quantisation.

The script builds one DiT MLP (pre-norm, fc1, SwiGLU, fc2) at the 24B width ratio (hidden : ffn =
3 : 8, scaled down so it runs on a CPU) in bf16, and the same MLP with the official fp8 modules,
and prints for one input:
  * the peak extra bytes of the bf16 MLP and of the fp8 MLP,
  * the peak extra bytes of quantising the fc2 input alone, next to its e4m3 result's size.

Usage:
    python scripts/fp8_memory.py                      # 8192 tokens, hidden 384, ffn 1024
    python scripts/fp8_memory.py --tokens 16384 --hidden 768 --ffn 2048
"""

from __future__ import annotations

import argparse
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode


class PeakBytes(TorchDispatchMode):
    """Live bytes of the storages allocated under the mode; ``peak`` is their maximum."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._storages: dict[int, list[int]] = {}  # data_ptr -> [live tensors, bytes]

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs)) if _is_dense(t)}
        for t in pytree.tree_leaves(out):
            if _is_dense(t):
                self._track(t, inputs)
        return out

    def _track(self, t: torch.Tensor, inputs: set[int]) -> None:
        storage = t.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if key in self._storages:  # a view of (or in-place op on) a tracked storage
            self._storages[key][0] += 1
        elif key in inputs or size == 0:  # a view of something allocated outside the mode
            return
        else:
            self._storages[key] = [1, size]
            self.live += size
            self.peak = max(self.peak, self.live)
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        entry = self._storages.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self._storages[key]


def _is_dense(t: object) -> bool:
    return isinstance(t, torch.Tensor) and t.layout == torch.strided and t.device.type != "meta"


def peak_extra_bytes(fn: Callable[..., Any], *args: Any) -> int:
    """Peak bytes allocated (and still alive) at any moment while ``fn(*args)`` runs."""
    with PeakBytes() as tracker:
        out = fn(*args)
    del out
    return tracker.peak


def build_mlps(hidden: int, ffn: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(bf16 MLP, fp8 MLP) of a 3-layer gated DiT: layer 0 stays bf16, layer 1 is quantised."""
    from magi.config import ModelConfig
    from magi.fp8 import swap_fp8_linears
    from magi.models.dit import DiT

    cfg = ModelConfig(
        num_layers=3,
        hidden_size=hidden,
        ffn_hidden_size=ffn,
        num_attention_heads=hidden // 64,
        num_query_groups=max(1, hidden // 256),
        kv_channels=64,
        caption_channels=32,
        caption_max_length=8,
        gated_linear_unit=True,
        params_dtype="torch.bfloat16",
    )
    torch.manual_seed(0)
    model = swap_fp8_linears(DiT(cfg), cfg.num_layers, quantize_weights=True)
    return model.videodit_blocks.layers[0].mlp, model.videodit_blocks.layers[1].mlp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--ffn", type=int, default=1024)
    args = parser.parse_args()
    from magi.fp8 import quantize_input

    bf16_mlp, fp8_mlp = build_mlps(args.hidden, args.ffn)
    h = torch.randn(args.tokens, 1, args.hidden).bfloat16()
    mib = 1 / 2**20
    with torch.inference_mode():
        bf16_peak = peak_extra_bytes(bf16_mlp, h)
        fp8_peak = peak_extra_bytes(fp8_mlp, h)
        fc2_in = torch.randn(args.tokens, args.ffn).bfloat16()
        quant_peak = peak_extra_bytes(quantize_input, fc2_in, fp8_mlp.linear_fc2.smooth_scale)
    print(f"tokens={args.tokens} hidden={args.hidden} ffn={args.ffn}")
    print(f"mlp_peak_extra_MiB bf16={bf16_peak * mib:.2f} fp8={fp8_peak * mib:.2f} ratio={fp8_peak / bf16_peak:.3f}")
    print(
        f"fc2_quantize_peak_extra_MiB={quant_peak * mib:.2f} e4m3_result_MiB={args.tokens * args.ffn * mib:.2f} "
        f"float32_copy_of_input_MiB={args.tokens * args.ffn * 4 * mib:.2f}"
    )


if __name__ == "__main__":
    main()
