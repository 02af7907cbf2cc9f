"""scripts/bench.py: the CPU smoke run (tiny config) and the analytic FLOP count."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO_ROOT, TINY_CONFIG

BENCH = REPO_ROOT / "scripts" / "bench.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("magi_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being created
    spec.loader.exec_module(module)
    return module


def test_tiny_pass_flops_match_hand_count(bench) -> None:
    """Tiny 4.5B-like model (3 layers, width 128, 4 heads x 32, 2 K/V groups, ffn 512 GELU,
    caption width 64), one pass of 2 chunks of 96 tokens: chunk 0 sees itself (96 keys), chunk 1
    sees both (192 keys); 50 and 7 caption tokens."""
    flops = bench.pass_flops(bench.TINY_MODEL, 96, [96, 192], [50, 7])
    # per token and layer: q, qx 2*128*128 + k, v 2*128*64 + proj 256*128 + fc1, fc2 2*128*512
    per_token_layer = 32768 + 16384 + 32768 + 131072
    per_caption_layer = 128 * 128  # linear_kv_xattn [2*2*32, 128]
    layers = 3 * (192 * per_token_layer + 57 * per_caption_layer)
    embed_and_head = 192 * (16 * 4 * 128 + 128 * 4 * 16) + 57 * 64 * 128  # conv, final, y_proj
    assert flops["linear"] == 2 * (layers + embed_and_head) == 258_195_456
    # QK^T and PV: 4 * pairs * heads * head_dim per layer; pairs = self + cross
    pairs = 96 * 96 + 96 * 192 + 96 * 57
    assert flops["attention"] == 3 * 4 * pairs * 4 * 32 == 50_872_320
    assert flops["total"] == 309_067_776


def test_per_token_flops_equal_the_built_layer_weights(bench) -> None:
    """The per-token linear count equals 2 x the weight sizes of one built layer's Linears."""
    from magi.models.dit import DiT

    with torch.device("meta"):
        model = DiT(bench.TINY_MODEL)
    layer = model.videodit_blocks.layers[0]
    token_linears = [
        layer.self_attention.linear_qkv.q,
        layer.self_attention.linear_qkv.qx,
        layer.self_attention.linear_qkv.k,
        layer.self_attention.linear_qkv.v,
        layer.self_attention.linear_proj,
        layer.mlp.linear_fc1,
        layer.mlp.linear_fc2,
    ]
    per_token = sum(m.weight.numel() for m in token_linears)
    one = bench.pass_flops(bench.TINY_MODEL, 1, [0], [0])["linear"]
    patch_and_head = model.x_embedder.weight.numel() + model.final_linear.linear.weight.numel()
    assert one == 2 * (3 * per_token + patch_and_head)


def test_bench_cpu_smoke_run_reports_every_field(tmp_path: Path, bench) -> None:
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        str(BENCH),
        "--device",
        "cpu",
        "--iters",
        "1",
        "--warmup",
        "0",
        "--peak",
        "0.001",
        "--json",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["mode"] == "window" and report["model"] == "tiny" and report["device"] == "cpu"
    assert report["attention_backend"] == "sdpa" and report["tokens_per_chunk"] == 96
    assert report["peak_gpu_memory_gib"] is None and report["peak_host_rss_gib"] > 0
    refresh, plain = report["passes"]["refresh"], report["passes"]["plain"]
    # distill, full window: refresh = clean chunk + 4 denoising + nearly-clean copy; plain = 4 + copy
    assert [p["chunks"] for p in refresh] == [6] and [p["chunks"] for p in plain] == [5]
    assert plain[0]["kv_range_chunks"] == [[0, 2], [0, 3], [0, 4], [0, 5], [5, 6]]
    assert refresh[0]["kv_range_chunks"] == [[0, 1], [0, 2], [0, 3], [0, 4], [0, 5], [5, 6]]
    expected = bench.pass_flops(bench.TINY_MODEL, 96, [96 * 2, 96 * 3, 96 * 4, 96 * 5, 96], [64] * 5)
    assert plain[0]["flops"] == expected
    step = report["plain_step"]
    assert step["ms_per_step"] > 0 and step["flops_per_step"] == expected["total"]
    assert step["mfu"] == pytest.approx(step["tflops_per_s"] / 0.001)
    assert "plain step:" in proc.stdout and "MFU" in proc.stdout


def test_base_step_has_three_cfg_passes(bench) -> None:
    runtime = {
        "window_size": 4,
        "num_steps": 8,
        "chunk_width": 6,
        "noise2clean_kvrange": [5, 4, 3, 2],
        "clean_chunk_kvrange": 1,
        "clean_t": 0.9999,
        "threshold": 0.3,
        "shortcut_mode": "8,16,16",
    }
    steps = bench.window_steps(runtime, distill=False, caption_tokens=20)
    text, prev, uncond = steps["refresh"]
    assert (text.name, prev.name, uncond.name) == ("text", "prev", "uncond")
    assert text.captions == (50, 20, 20, 20, 20) and prev.captions == (50,) * 5
    assert prev.cache_write_chunks == 1 and text.cache_write_chunks == 0
    assert uncond.batch == 4 and uncond.kv_chunks == ((0, 1), (1, 2), (2, 3), (3, 4))
    assert steps["plain"][0].slice_point == 1 and steps["plain"][0].kv_chunks[0] == (0, 2)


def test_fp8_compare_skips_on_cpu(bench) -> None:
    args = bench.parse_args(["--device", "cpu", "--fp8-compare"])
    report = bench.bench_fp8_compare(args, torch.device("cpu"))
    assert "needs a CUDA GPU" in report["skipped"]


def test_floor_of_the_4p5b_distill_video(bench) -> None:
    """720x720, 96 frames (4 chunks), 16 steps: 28 steps, one pass each."""
    report = bench.bench_floor(bench.parse_args(["--device", "cpu", "--floor", "--model", "4.5B", "--num-steps", "16"]))
    assert report["tokens_per_chunk"] == 6 * 45 * 45 and report["steps"] == 28 and report["passes"] == 28
    assert report["total"] == report["linear"] + report["attention"]
    assert report["seconds_at_peak"] == pytest.approx(report["total"] / 989e12)


@pytest.fixture(scope="module")
def count_passes():
    spec = importlib.util.spec_from_file_location("magi_count_passes", REPO_ROOT / "scripts" / "count_passes.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("case", ["t2v_4p5b_base", "t2v_24b_base", "t2v_4p5b_distill_quant"])
def test_bench_pass_layout_matches_the_official_calls(reference_dir: Path, count_passes, case: str) -> None:
    """The pass layout bench.py times (step_passes) gives exactly the official run's passes."""
    from magi.config import config_from_dict

    meta = json.loads((reference_dir / f"pipeline_{case}.json").read_text())
    cfg = config_from_dict(meta["config_content"])
    official = count_passes.official_from_fixture(meta, tokens_per_chunk=96)
    from_plan = count_passes.official_from_plan(cfg, meta["transport"]["chunk_num"], tokens_per_chunk=96)
    assert from_plan == official


def test_count_passes_on_the_fixtures(reference_dir: Path, count_passes) -> None:
    rows = {r["case"]: r for r in count_passes.main(["--reference-dir", str(reference_dir), "--json"])}
    base = rows["t2v_4p5b_base"]
    # official: 14 calls x 3 passes; magi skips the text pass and the unconditional chunks whose
    # CFG weight is exactly 0 (the last stage), so it runs fewer token-passes for the same video
    assert base["official"]["passes"] == 42 and base["official"]["chunk_passes"] == 102
    assert base["magi"]["steps"] == 14 and base["magi"]["token_passes"] < base["official"]["token_passes"]
    assert rows["v2v_4p5b_base"]["official"]["passes"] == 3 * 17  # prefix call + 16 steps
    distill = rows["i2v_4p5b_distill"]
    assert distill["magi"] == distill["official"]


def test_memory_mode_counts_the_released_parameters(bench) -> None:
    """4.5B: 4,459,898,128 parameters (official manifest); KV rows 34 layers x c x 8 x 256 bf16."""
    report = bench.bench_memory(bench.parse_args(["--device", "cpu", "--memory", "--model", "4.5B"]))
    assert report["dit_params"] == 4_459_898_128
    assert report["kv_cache_per_chunk_gib"] * bench.GIB == 34 * 12150 * 8 * 256 * 2
    assert report["kv_cache_chunks_kept"] == 1  # shipped ranges: only the refreshed chunk is read
    assert report["dit_streamed_resident_gib"] < report["dit_weights_gib"] / 10


TINY_CHECKPOINTS = REPO_ROOT / "example" / "tiny" / "checkpoints"


@pytest.mark.skipif(
    importlib.util.find_spec("magi.pipeline") is None or not (TINY_CHECKPOINTS / "special_tokens.npz").is_file(),
    reason="needs magi.pipeline and the tiny checkpoint (python scripts/make_tiny_checkpoint.py "
    "--config example/tiny/config.json --out example/tiny/checkpoints)",
)
def test_e2e_mode_on_the_tiny_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "e2e.json"
    env = {
        **os.environ,
        "SPECIAL_TOKEN_PATH": str(TINY_CHECKPOINTS / "special_tokens.npz"),
        "PAD_HQ": "1",
        "PAD_DURATION": "1",
    }
    cmd = [
        sys.executable,
        str(BENCH),
        "--e2e",
        "--device",
        "cpu",
        "--config",
        str(TINY_CONFIG),
        "--num-frames",
        "48",
        "--offload",
        "--json",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["mode"] == "e2e" and report["chunks"] == 2 and report["frames_written"] == 48
    assert 0 < report["time_to_first_chunk_s"] <= report["total_seconds"]
    assert report["seconds_per_chunk"] > 0 and report["offload_blocks"] is True
