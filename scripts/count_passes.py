#!/usr/bin/env python
"""Count DiT token-passes per generated chunk: magi's sampler against the official run.

A *token-pass* is one video token through the whole layer stack once; a DiT pass over R chunks
of c tokens is R·c token-passes. The compute of a video is (nearly) proportional to them.

* official: every DiT call the official sampler made is listed in the reference fixtures
  (``pipeline_<case>.json``, ``dit_calls``); its dispatcher runs 3 passes per call for base models
  (text and text-dropped over all R chunks of the call, unconditional over the R − extra
  denoising chunks) and 1 pass for distilled ones (+ the nearly-clean copy when flagged). The v2v
  prefix call goes through the same dispatcher.
* magi: ``magi.sampling.denoise`` is run on the same plan with a stub model that records the
  shape of every forward call and returns zeros (no weights, no compute).

With ``--preset`` (e.g. ``4.5B_base``) the same comparison is made at real sizes, the official
layout taken from the plan (scripts/bench.py ``step_passes``) instead of a fixture.

Usage:
    python scripts/count_passes.py                    # the five reference fixtures
    python scripts/count_passes.py --preset 4.5B_distill --height 720 --width 720 --num-steps 16
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from magi.config import ModelConfig, config_from_dict, preset  # noqa: E402
from magi.sampling.denoise import CaptionTable, SamplerSettings, denoise  # noqa: E402

CASES = ("t2v_4p5b_base", "t2v_24b_base", "v2v_4p5b_base", "i2v_4p5b_distill", "t2v_4p5b_distill_quant")
DEFAULT_REFERENCE = Path(os.environ.get("MAGI_REFERENCE_DIR", REPO.parent / "shared" / "reference"))


class RecordingDiT(nn.Module):
    """Stands in for the DiT: records (batch, chunks, tokens) of every forward, returns zeros."""

    def __init__(self, config: ModelConfig, chunk_width: int) -> None:
        super().__init__()
        self.config, self.chunk_width = config, chunk_width
        self.calls: list[dict[str, int]] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        b, _, frames, h, w = x.shape
        p = self.config.patch_size
        chunks = b * frames // self.chunk_width
        tokens = b * frames // self.config.t_patch_size * (h // p) * (w // p)
        self.calls.append({"batch": b, "chunks": chunks, "tokens": tokens})
        return torch.zeros_like(x, dtype=torch.float32)


def magi_counts(cfg, chunk_num: int, prefix_frames: int, latent_hw: tuple[int, int]) -> dict:
    """Run magi's sampler with the recording stub; sum its passes."""
    settings = SamplerSettings.from_config(cfg, prev_chunks_scale_value=0.7)
    plan = settings.plan(chunk_num, prefix_frames)
    model = RecordingDiT(cfg.model, settings.chunk_width)
    h, w = latent_hw
    lcap, ccap = cfg.model.caption_max_length, cfg.model.caption_channels
    mask = torch.zeros(2, chunk_num, lcap)
    mask[:, :, :50] = 1
    captions = CaptionTable(torch.zeros(2, chunk_num, lcap, ccap), mask)
    noise = torch.zeros(1, 16, chunk_num * settings.chunk_width, h, w)
    prefix = torch.zeros(1, 16, prefix_frames, h, w) if prefix_frames else None
    emitted = sum(1 for _ in denoise(model, plan, settings, captions, noise, prefix=prefix))
    return _totals(model.calls, plan.total_steps, emitted)


def official_from_fixture(meta: dict, tokens_per_chunk: int) -> dict:
    """Passes of every recorded official dispatcher call."""
    cfg_number = meta["config_content"]["runtime_config"]["cfg_number"]
    passes = []
    for call in meta["dit_calls"]:
        kw = call["kwargs"]
        r, extra = kw["denoising_range_num"], int(kw["fwd_extra_1st_chunk"])
        if cfg_number == 3:
            chunk_counts = [r, r, r - extra]
        else:
            copy = int(kw.get("distill_nearly_clean_chunk", False) and not kw.get("extract_prefix_video_feature"))
            chunk_counts = [r + copy]
        passes += [{"chunks": n, "tokens": n * tokens_per_chunk} for n in chunk_counts]
    steps = sum(1 for call in meta["dit_calls"] if not call["kwargs"].get("extract_prefix_video_feature"))
    return _totals(passes, steps, len(meta["chunks"]))


def official_from_plan(cfg, chunk_num: int, tokens_per_chunk: int) -> dict:
    """Official pass layout of a t2v run at real sizes, from the chunk plan (no fixture)."""
    bench = _load_bench()
    rt, en = cfg.runtime, cfg.engine
    settings = SamplerSettings.from_config(cfg, prev_chunks_scale_value=0.7)
    plan = settings.plan(chunk_num, 0)
    ts = bench.time_schedule(rt.num_steps, en.shortcut_mode)
    passes = []
    for step in plan.steps():
        for spec in bench.step_passes(
            plan,
            step,
            ts,
            distill=settings.distill,
            clean_t=rt.clean_t,
            threshold=en.distill_nearly_clean_chunk_threshold,
            caption_tokens=50,
        ):
            n = len(spec.kv_chunks)
            passes.append({"chunks": n, "tokens": n * tokens_per_chunk})
    return _totals(passes, plan.total_steps, len(plan.generated_chunks))


def _totals(passes: list[dict], steps: int, emitted: int) -> dict:
    token_passes = sum(p["tokens"] for p in passes)
    return {
        "steps": steps,
        "passes": len(passes),
        "chunk_passes": sum(p["chunks"] for p in passes),
        "token_passes": token_passes,
        "generated_chunks": emitted,
        "token_passes_per_chunk": token_passes / emitted,
    }


def _load_bench():
    spec = importlib.util.spec_from_file_location("magi_bench", REPO / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def fixture_case(reference: Path, case: str) -> dict:
    meta = json.loads((reference / f"pipeline_{case}.json").read_text())
    cfg = config_from_dict(meta["config_content"])
    _, _, _, h, w = meta["transport"]["latent_size"]
    prefix = meta["tensors"].get("input.prefix_latent", {"shape": [0, 0, 0]})["shape"][2]
    p = cfg.model.patch_size
    tokens = cfg.runtime.chunk_width * (h // p) * (w // p)
    return {
        "case": case,
        "tokens_per_chunk": tokens,
        "official": official_from_fixture(meta, tokens),
        "magi": magi_counts(cfg, meta["transport"]["chunk_num"], prefix, (h, w)),
    }


def preset_case(name: str, height: int, width: int, num_frames: int, num_steps: int | None = None) -> dict:
    cfg = preset(name)
    steps = cfg.runtime.num_steps if num_steps is None else num_steps
    runtime = replace(cfg.runtime, video_size_h=height, video_size_w=width, num_frames=num_frames, num_steps=steps)
    cfg = cfg.replace(runtime=runtime)
    h, w = height // 8, width // 8
    p = cfg.model.patch_size
    tokens = cfg.runtime.chunk_width * (h // p) * (w // p)
    chunk_num = math.ceil(num_frames // cfg.runtime.temporal_downsample_factor / cfg.runtime.chunk_width)
    return {
        "case": f"{name} t2v {height}x{width} {num_frames} frames, {cfg.runtime.num_steps} steps",
        "tokens_per_chunk": tokens,
        "official": official_from_plan(cfg, chunk_num, tokens),
        "magi": magi_counts(cfg, chunk_num, 0, (h, w)),
    }


def print_rows(rows: list[dict]) -> None:
    head = f"{'case':<44} {'who':<9} {'steps':>5} {'passes':>6} {'chunk-passes':>12} {'token-passes/chunk':>18}"
    print(head)
    for row in rows:
        for who in ("official", "magi"):
            c = row[who]
            print(
                f"{row['case']:<44} {who:<9} {c['steps']:>5} {c['passes']:>6} {c['chunk_passes']:>12} "
                f"{c['token_passes_per_chunk']:>18.1f}"
            )
        ratio = row["magi"]["token_passes"] / row["official"]["token_passes"]
        print(f"{'':<44} magi/official token-passes: {ratio:.3f}")


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reference-dir", type=Path, default=DEFAULT_REFERENCE)
    p.add_argument("--case", action="append", choices=CASES, help="fixture case(s); default all")
    p.add_argument("--preset", help="count at real sizes for a shipped config, e.g. 4.5B_base")
    p.add_argument("--height", type=int, default=720)
    p.add_argument("--width", type=int, default=720)
    p.add_argument("--num-frames", type=int, default=96)
    p.add_argument("--num-steps", type=int, help="override the preset's num_steps")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = p.parse_args(argv)
    if args.preset:
        rows = [preset_case(args.preset, args.height, args.width, args.num_frames, args.num_steps)]
    else:
        if not (args.reference_dir / "README.md").is_file():
            p.error(
                f"reference fixtures not found at {args.reference_dir} (set --reference-dir or $MAGI_REFERENCE_DIR)"
            )
        rows = [fixture_case(args.reference_dir, case) for case in args.case or CASES]
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print_rows(rows)
    return rows


if __name__ == "__main__":
    main()
