"""Peak memory of a generation does not grow with the video length (tiny model, CPU).

    python scripts/bench_memory.py                      # 4 and 40 chunks, tiny example config
    python scripts/bench_memory.py --chunks 4 40 80 --device cpu
    python scripts/bench_memory.py --noise 720 1280 --chunks 10 40 160   # the initial noise alone

Each length runs in a fresh process (peak RSS is per process): load the pipeline, generate one
warm-up chunk (T5 encode, allocator, ffmpeg start-up), then generate N chunks to an mp4 while the
resident set size is sampled after every sampler step. Printed per N: RSS before the run, peak RSS
during it, and the growth. The check: the peak for the longest video is at most 1.1x the peak for
the shortest (exit status 1 otherwise).

The tiny checkpoint comes from the config's paths when they exist, otherwise it is written to a
temporary folder with scripts/make_tiny_checkpoint.py (seconds).

``--noise H W``: the initial noise of an H x W video alone (no model), the part of host memory that
used to grow with the length (16 x 6 x H/8 x W/8 float32 per chunk, 5.5 MB at 720x1280). Each
length runs in a fresh process that draws the noise the way the pipeline does
(``magi.sampling.noise.InitialNoise``) and reads every chunk's slice, once held in memory and once
spilled to a temporary file; printed: the RSS growth of each. The check: the spilled growth for the
longest video is at most 1.1x that for the shortest + 8 MiB.

``--cli``: the real command line, as a user runs it (issue 24). Per length (``--frames``), a fresh
``python -m magi.infer --config_file CONFIG --device cpu --mode t2v --prompt ... --num_frames N
--output_path OUT.mp4 [flags]`` runs while the resident set size of its whole process tree (python
and its ffmpeg children) is summed from /proc every 50 ms. CONFIG is the tiny *distill* model:
example/tiny/config.json with distill true, cfg_number 1, num_steps 4 and the video size of
``--size`` (192 x 192 by default), with a fresh tiny checkpoint written for it. ``--save_state``,
``--steer`` (a steer file that changes the prompt at 1/4, 1/2 and 3/4 of the video) and
``--save_tensors`` add those flags with paths in a temporary folder; arguments after ``--`` go to
the CLI unchanged. Printed per length: frames, chunks, peak tree RSS, ratio to the shortest, wall
time; then the sampled peaks of python alone and of its children (ffmpeg), and the tree's peak in
each quarter of the run (flat when the later quarters do not climb above the earlier ones). The check: every ratio is at most ``--max-ratio`` (1.05; exit status 1 otherwise).
``--config FILE`` measures that config (and its checkpoints) as it is instead.

    python scripts/bench_memory.py --cli --frames 96 960
    python scripts/bench_memory.py --cli --frames 96 960 2400 --save_state --steer --save_tensors
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable as a plain script from a checkout
    sys.path.insert(0, str(REPO))

DEFAULT_CONFIG = REPO / "example" / "tiny" / "config.json"
MAX_RATIO = 1.1


def current_rss() -> int:
    """Resident set size of this process in bytes (Linux /proc; elsewhere the peak so far)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _ready_config(config: Path, workdir: Path) -> Path:
    """A config whose checkpoints exist: the given one, or a copy pointing at fresh tiny weights."""
    from magi.config import ConfigError, check_paths, load_config, save_config

    cfg = load_config(config)
    try:
        check_paths(cfg)
        return config.resolve()
    except ConfigError:
        pass
    sys.path.insert(0, str(REPO / "scripts"))
    from make_tiny_checkpoint import make_tiny_checkpoint

    out = workdir / "checkpoints"
    print(f"writing a tiny checkpoint to {out}", flush=True)
    make_tiny_checkpoint(out, config, seed=0)
    runtime = dataclasses.replace(
        cfg.runtime, load=str(out / "magi" / "tiny"), t5_pretrained=str(out / "t5"), vae_pretrained=str(out / "vae")
    )
    path = workdir / "config.json"
    save_config(cfg.replace(runtime=runtime), path)
    return path


def _special_tokens(config: Path) -> str | None:
    from magi.config import load_config

    load = load_config(config).runtime.load or ""
    candidate = Path(load).resolve().parents[1] / "special_tokens.npz"  # <out>/magi/tiny -> <out>
    return str(candidate) if candidate.is_file() else os.environ.get("SPECIAL_TOKEN_PATH")


def child(config: Path, chunks: int, device: str) -> dict[str, float]:
    """Generate ``chunks`` chunks in this process; return RSS numbers in MiB."""
    import torch

    from magi.pipeline import MagiPipeline

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    pipe = MagiPipeline.from_config(config, device=device)
    fps = pipe.config.runtime.fps
    frames_per_chunk = pipe.config.runtime.chunk_width * pipe.config.runtime.temporal_downsample_factor
    with tempfile.TemporaryDirectory() as tmp:
        pipe.generate("t2v", "a quiet street", output_path=Path(tmp) / "warm.mp4", num_frames=frames_per_chunk)
        baseline = peak = current_rss()

        def sample(_info: object) -> None:
            nonlocal peak
            peak = max(peak, current_rss())

        start = time.perf_counter()
        result = pipe.generate(
            "t2v",
            "a quiet street",
            output_path=Path(tmp) / "run.mp4",
            num_frames=frames_per_chunk * chunks,
            callback=sample,
        )
        elapsed = time.perf_counter() - start
    peak = max(peak, current_rss())
    mib = 2.0**20
    return {
        "chunks": chunks,
        "frames": result.frames_written,
        "fps": fps,
        "seconds": round(elapsed, 2),
        "rss_before_mib": round(baseline / mib, 1),
        "peak_rss_mib": round(peak / mib, 1),
        "growth_mib": round((peak - baseline) / mib, 1),
    }


def noise_child(chunks: int, size: tuple[int, int], spill_bytes: int) -> dict[str, float]:
    """Draw the noise of ``chunks`` chunks at ``size`` and read every chunk; RSS growth in MiB."""
    import torch

    from magi.sampling.noise import InitialNoise

    torch.randn(2**20)  # allocator warm-up
    shape, cw = (1, 16, 6 * chunks, size[0] // 8, size[1] // 8), 6
    before, peak0 = current_rss(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    noise = InitialNoise.draw(shape, 1234, cw, spill_bytes=spill_bytes)
    high = current_rss()
    for k in range(chunks):
        noise.chunk(k)
        high = max(high, current_rss())
    spilled = noise.spilled
    noise.close()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    mib = 2.0**20
    growth = max(high - before, peak - peak0)
    return {
        "chunks": chunks,
        "spilled": spilled,
        "noise_mib": round(4 * math.prod(shape) / mib, 1),
        "growth_mib": round(growth / mib, 1),
        "seconds": round(time.perf_counter() - start, 2),
    }


def run_noise(size: tuple[int, int], chunks: list[int]) -> int:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    growth: dict[bool, list[float]] = {False: [], True: []}
    for n in sorted(chunks):
        for spill in (False, True):
            cmd = [
                sys.executable,
                __file__,
                "--noise",
                *map(str, size),
                "--child",
                str(n),
                "--spill-bytes",
                str(0 if spill else 2**62),
            ]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if out.returncode != 0:
                print(out.stderr[-3000:], file=sys.stderr)
                return out.returncode
            r = json.loads(out.stdout.strip().splitlines()[-1])
            growth[spill].append(r["growth_mib"])
            print(
                f"{n:5d} chunks, noise {r['noise_mib']:8.1f} MiB, "
                f"{'spilled  ' if r['spilled'] else 'in memory'}: RSS growth {r['growth_mib']:7.1f} MiB "
                f"({r['seconds']:.1f} s)",
                flush=True,
            )
    first, last = growth[True][0], growth[True][-1]
    ok = last <= MAX_RATIO * first + 8
    print(
        f"spilled growth {last:.1f} MiB ({max(chunks)} chunks) vs {first:.1f} MiB ({min(chunks)} chunks): "
        f"{'ok' if ok else 'FAIL'}"
    )
    return 0 if ok else 1


CLI_MAX_RATIO = 1.05
CLI_PROMPT = "a quiet street"
STEER_PROMPTS = ("a street in the rain", "a street at night", "a street in the snow")


def tree_rss(root: int) -> tuple[int, int]:
    """Resident set sizes in bytes of process ``root`` and, summed, of all its descendants (/proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # the process ended while we looked
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])  # fields after "(comm)": state, ppid
        children.setdefault(ppid, []).append(int(entry.name))
    own, others, todo, page = 0, 0, [root], os.sysconf("SC_PAGE_SIZE")
    try:
        command = Path(f"/proc/{root}/cmdline").read_bytes()
    except OSError:
        return 0, 0
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, ()))
        try:
            # a child forked (vfork: sharing the parent's memory) before its exec shows the
            # parent's command and resident set: counting it would count python twice
            if pid != root and Path(f"/proc/{pid}/cmdline").read_bytes() == command:
                continue
            rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page
        except (OSError, ValueError, IndexError):
            continue
        own, others = (rss, others) if pid == root else (own, others + rss)
    return own, others


def run_sampled(cmd: list[str], env: dict[str, str], log: Path, every: float = 0.05) -> dict[str, object]:
    """Run ``cmd`` to its end, sampling its process tree's RSS every ``every`` s: the peaks (tree,
    python alone, its children), the tree's peak in each quarter of the run, and the wall time."""
    start = time.perf_counter()
    samples: list[tuple[float, int, int]] = []  # (seconds, python RSS, children RSS)
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        status, rusage = None, None
        while status is None:
            samples.append((time.perf_counter() - start, *tree_rss(proc.pid)))
            pid, code, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                status, rusage = os.waitstatus_to_exitcode(code), usage
            else:
                time.sleep(every)
        proc.returncode = status
    seconds = time.perf_counter() - start
    quarters = [0, 0, 0, 0]
    for t, own, others in samples:
        q = min(3, int(4 * t / seconds))
        quarters[q] = max(quarters[q], own + others)
    return {
        "rc": status,
        "seconds": seconds,
        "peak_tree": max(own + others for _, own, others in samples),
        "peak_python": max(own for _, own, _ in samples),
        "peak_children": max(others for _, _, others in samples),
        "quarters": quarters,
        "python_maxrss": rusage.ru_maxrss * 1024 if rusage else 0,
    }


def _distill_config(workdir: Path, size: tuple[int, int]) -> Path:
    """The tiny distill config (distill, cfg_number 1, num_steps 4, video ``size``) with fresh weights."""
    from magi.config import load_config, save_config
    from magi.tiny import make_tiny_checkpoint

    cfg = load_config(DEFAULT_CONFIG)
    ck = workdir / "checkpoints"
    paths = dict(load=str(ck / "magi" / "tiny"), t5_pretrained=str(ck / "t5"), vae_pretrained=str(ck / "vae"))
    runtime = dataclasses.replace(
        cfg.runtime, **paths, cfg_number=1, num_steps=4, video_size_h=size[0], video_size_w=size[1]
    )
    path = workdir / "config.json"
    save_config(cfg.replace(runtime=runtime, engine=dataclasses.replace(cfg.engine, distill=True)), path)
    print(f"writing a tiny distill checkpoint to {ck}", flush=True)
    make_tiny_checkpoint(ck, path, seed=0)  # the engine flags name its weight folder
    return path


def _cli_command(args: argparse.Namespace, config: Path, frames: int, run_dir: Path) -> list[str]:
    """The ``python -m magi.infer`` argv of one length, its flag paths inside ``run_dir``."""
    cmd = [sys.executable, "-m", "magi.infer", "--config_file", str(config), "--device", "cpu", "--mode", "t2v"]
    cmd += ["--prompt", CLI_PROMPT, "--num_frames", str(frames), "--output_path", str(run_dir / "out.mp4")]
    if args.save_state:
        cmd += ["--save_state", str(run_dir / "state")]
    if args.save_tensors:
        cmd += ["--save_tensors", str(run_dir / "tensors.safetensors")]
    if args.steer:
        chunks = _chunks(config, frames)
        lines = [
            json.dumps({"from_chunk": max(1, chunks * (i + 1) // 4), "prompt": text})
            for i, text in enumerate(STEER_PROMPTS)
        ]
        (run_dir / "steer.jsonl").write_text("\n".join(lines) + "\n")
        cmd += ["--steer", str(run_dir / "steer.jsonl")]
    return cmd + list(args.cli_args)


def run_cli(args: argparse.Namespace) -> int:
    """The ``--cli`` mode: peak process-tree RSS of the real CLI per length (module docstring)."""
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        config = args.config if args.config != DEFAULT_CONFIG else _distill_config(Path(workdir), tuple(args.size))
        env = dict(os.environ, PYTHONPATH=str(REPO), SPECIAL_TOKEN_PATH=_special_tokens(config) or "")
        for frames in sorted(args.frames):
            run_dir = Path(workdir) / f"run{frames}"
            run_dir.mkdir()
            cmd = _cli_command(args, config, frames, run_dir)
            print(" ".join(cmd), flush=True)
            r = run_sampled(cmd, env, run_dir / "log.txt")
            if r["rc"] != 0:
                print((run_dir / "log.txt").read_text()[-3000:], file=sys.stderr)
                return int(r["rc"]) or 1
            rows.append({"frames": frames, **r, "chunks": _chunks(config, frames)})
            first = rows[0]["peak_tree"]
            print(
                f"{frames:6d} frames {rows[-1]['chunks']:>4} chunks: peak tree RSS {r['peak_tree'] / 1e6:7.1f} MB "
                f"(python alone {r['python_maxrss'] / 1e6:7.1f} MB), ratio {r['peak_tree'] / first:.3f}, "
                f"wall {r['seconds']:.0f} s",
                flush=True,
            )
            print(
                f"{'':20}sampled peaks: python {r['peak_python'] / 1e6:.1f} MB, its children (ffmpeg) "
                f"{r['peak_children'] / 1e6:.1f} MB; tree by quarter of the run "
                + " / ".join(f"{q / 1e6:.1f}" for q in r["quarters"])
                + " MB",
                flush=True,
            )
    worst = max(r["peak_tree"] for r in rows) / rows[0]["peak_tree"]
    ok = worst <= args.max_ratio
    print(f"largest ratio {worst:.3f} ({'ok' if ok else 'FAIL'}: must be <= {args.max_ratio})")
    return 0 if ok else 1


def _chunks(config: Path, frames: int) -> int:
    """Chunks the CLI generates for ``frames`` frames (it rounds up to whole chunks)."""
    from magi.config import load_config

    rt = load_config(config).runtime
    return math.ceil(frames / (rt.chunk_width * rt.temporal_downsample_factor))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="tiny config (official JSON)")
    parser.add_argument("--chunks", type=int, nargs="+", default=[4, 40], help="video lengths in chunks")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--noise",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        help="measure the initial noise alone for an H x W video (no model)",
    )
    cli = parser.add_argument_group("--cli: the real command line (python -m magi.infer)")
    cli.add_argument("--cli", action="store_true", help="measure the CLI's process tree per --frames")
    cli.add_argument("--frames", type=int, nargs="+", default=[96, 960], help="video lengths in frames")
    cli.add_argument("--size", type=int, nargs=2, default=[192, 192], metavar=("H", "W"), help="video size")
    cli.add_argument("--save_state", action="store_true", help="add --save_state (and chunk segments)")
    cli.add_argument("--steer", action="store_true", help="add --steer with a file of three prompt changes")
    cli.add_argument("--save_tensors", action="store_true", help="add --save_tensors")
    cli.add_argument("--max-ratio", type=float, default=CLI_MAX_RATIO, help="bound on peak(N) / peak(shortest)")
    cli.add_argument("cli_args", nargs="*", help="after --: further arguments for python -m magi.infer")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--spill-bytes", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cli:
        return run_cli(args)
    if args.child is not None and args.noise:
        print(json.dumps(noise_child(args.child, tuple(args.noise), args.spill_bytes)), flush=True)
        return 0
    if args.child is not None:
        print(json.dumps(child(args.config, args.child, args.device)), flush=True)
        return 0
    if min(args.chunks) < 1:
        parser.error("--chunks must be >= 1")
    if args.noise:
        return run_noise(tuple(args.noise), args.chunks)
    with tempfile.TemporaryDirectory() as workdir:
        config = _ready_config(args.config, Path(workdir))
        env = dict(os.environ, PYTHONPATH=str(REPO))
        tokens = _special_tokens(config)
        if tokens:
            env["SPECIAL_TOKEN_PATH"] = tokens
        rows = []
        for n in sorted(args.chunks):
            cmd = [sys.executable, __file__, "--config", str(config), "--device", args.device, "--child", str(n)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if out.returncode != 0:
                print(out.stderr[-3000:], file=sys.stderr)
                return out.returncode
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(
                f"{r['chunks']:4d} chunks ({r['frames']} frames, {r['seconds']:.1f} s): RSS before "
                f"{r['rss_before_mib']:.1f} MiB, peak {r['peak_rss_mib']:.1f} MiB, growth "
                f"{r['growth_mib']:+.1f} MiB",
                flush=True,
            )
    ratio = rows[-1]["peak_rss_mib"] / rows[0]["peak_rss_mib"]
    ok = ratio <= MAX_RATIO
    print(
        f"peak({rows[-1]['chunks']} chunks) / peak({rows[0]['chunks']} chunks) = {ratio:.3f} "
        f"({'ok' if ok else 'FAIL'}: must be <= {MAX_RATIO})"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
