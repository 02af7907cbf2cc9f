"""`torchrun --nproc_per_node 2 -m magi.infer` (cp_size 2, gloo, loopback) equals the plain run.

Runs the CLI end to end on the tiny 4.5B-like reference checkpoint (T5, DiT, VAE): one chunk of
t2v once with plain python and once under torchrun; the final latents must agree and only rank 0
may write the mp4.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

from tests.helpers import REPO_ROOT, free_port, rel_l2

TOL = 1e-5


def _config(reference_dir: Path, tmp_path: Path, cp: int) -> Path:
    data = json.loads((reference_dir / "configs" / "tiny_4p5b_base.json").read_text())
    data["engine_config"].update(cp_size=cp, cp_strategy="cp_ulysses", distributed_backend="gloo")
    path = tmp_path / f"tiny_cp{cp}.json"
    path.write_text(json.dumps(data))
    return path


def _infer(reference_dir: Path, tmp_path: Path, cp: int) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / f"cp{cp}"
    out.mkdir()
    launcher = [sys.executable]
    if cp > 1:
        launcher += [
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(cp),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),
        ]
    args = [
        "-m",
        "magi.infer",
        "--config",
        str(_config(reference_dir, tmp_path, cp)),
        "--mode",
        "t2v",
        "--prompt",
        "Good Boy",
        "--num_frames",
        "24",
        "--device",
        "cpu",
        "--output_path",
        str(out / "video.mp4"),
        "--save_tensors",
        str(out / "tensors.safetensors"),
    ]
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO_ROOT),
        OMP_NUM_THREADS="1",
        SPECIAL_TOKEN_PATH=str(reference_dir / "special_tokens.npz"),
    )
    # Checkpoint paths in the tiny configs are relative to the reference folder, as officially.
    proc = subprocess.run(launcher + args, cwd=reference_dir, env=env, capture_output=True, text=True, timeout=240)
    return proc, out


def test_torchrun_cp2_cli_equals_single_process(reference_dir: Path, tmp_path: Path) -> None:
    single, single_out = _infer(reference_dir, tmp_path, 1)
    assert single.returncode == 0, single.stderr[-3000:]
    parallel, parallel_out = _infer(reference_dir, tmp_path, 2)
    assert parallel.returncode == 0, parallel.stderr[-3000:]
    expected = load_file(str(single_out / "tensors.safetensors"))["final_latent"]
    got = load_file(str(parallel_out / "tensors.safetensors"))["final_latent"]
    err = rel_l2(got, expected)
    assert err <= TOL, f"final latent rel L2 {err:.2e}"
    assert sorted(p.name for p in parallel_out.iterdir()) == ["tensors.safetensors", "video.mp4"]
    assert parallel.stdout.count("done: ") == 1, parallel.stdout  # only rank 0 reports the file
