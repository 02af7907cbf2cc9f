#!/usr/bin/env python
"""Time a cold start: ``MagiPipeline.from_config`` + one ``generate``, each repeat in a fresh process.

Every repeat is a new Python process (imports, the start-up checks and the loads all count, as
in a real run); the imports of magi itself happen before the clock starts. Prints one line per
repeat and the medians, in seconds: wall time (``*_s``) and the child's CPU time (``*_cpu_s``,
one torch thread by default, so the two agree on an idle machine; on a shared machine the CPU
time is the steadier figure). ``process_cpu_s`` is the whole child process's CPU time (Python
start-up and the imports of torch and magi included); ``ffmpeg_cpu_s`` that of the mp4 writer it
starts (not in the other figures). Defaults to the tiny CPU demo (example/tiny/config.json;
write its checkpoint first with scripts/make_tiny_checkpoint.py --out example/tiny/checkpoints).

    python scripts/bench_startup.py                      # tiny config, 3 repeats, CPU
    python scripts/bench_startup.py --repeats 5 --num-frames 24
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Run in the child: the pipeline module is imported before the clock starts (import cost of magi
# itself is not what this measures); from_config and generate are timed separately.
_CHILD = r"""
import json, sys, time
import torch
torch.set_num_threads(int(sys.argv[5]))
from magi.pipeline import MagiPipeline
t0, c0 = time.perf_counter(), time.process_time()
pipe = MagiPipeline.from_config(sys.argv[1], device="cpu")
t1, c1 = time.perf_counter(), time.process_time()
pipe.generate("t2v", "A dog runs on the beach", output_path=sys.argv[2], seed=int(sys.argv[3]),
              num_frames=int(sys.argv[4]))
t2, c2 = time.perf_counter(), time.process_time()
import resource
own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"from_config_s": t1 - t0, "generate_s": t2 - t1, "total_s": t2 - t0,
                  "from_config_cpu_s": c1 - c0, "generate_cpu_s": c2 - c1, "total_cpu_s": c2 - c0,
                  "process_cpu_s": own.ru_utime + own.ru_stime, "ffmpeg_cpu_s": kids.ru_utime + kids.ru_stime}))
"""


def run_once(config: Path, num_frames: int, threads: int) -> dict[str, float]:
    """One cold start in a fresh process; returns its timings (seconds)."""
    checkpoints = REPO / "example" / "tiny" / "checkpoints"
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO),
        PAD_HQ="1",
        PAD_DURATION="1",
        SPECIAL_TOKEN_PATH=str(checkpoints / "special_tokens.npz"),
    )
    with tempfile.TemporaryDirectory(prefix="magi-bench-startup-") as tmp:
        out = Path(tmp) / "out.mp4"
        cmd = [sys.executable, "-c", _CHILD, str(config), str(out), "1234", str(num_frames), str(threads)]
        result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        tail = result.stderr.strip().splitlines()[-1:] or ["no output"]
        raise SystemExit(f"bench child failed: {tail[0]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "example" / "tiny" / "config.json"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--num-frames", type=int, default=24, help="video length of the one generate call")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads in the child")
    args = p.parse_args(argv)
    runs = []
    for i in range(args.repeats):
        runs.append(run_once(Path(args.config).resolve(), args.num_frames, args.threads))
        print(f"run {i}: " + ", ".join(f"{k} {v:.3f}" for k, v in runs[-1].items()), flush=True)
    medians = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print("median: " + ", ".join(f"{k} {v:.3f}" for k, v in medians.items()))


if __name__ == "__main__":
    main()
