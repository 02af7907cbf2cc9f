"""Command line: ``python -m magi.infer --config CONFIG --mode t2v|i2v|v2v --prompt ... --output_path out.mp4``.

The official entry point's flags are kept (``--config_file``, ``--mode``, ``--prompt``,
``--image_path``, ``--prefix_video_path``, ``--output_path``). Every argument, file and config
problem (an input that does not decode, an output folder that cannot be written) is reported as one
``error: ...`` line with exit status 2 before any model is loaded; only then is the pipeline built.
Later file or ffmpeg failures are one line with exit status 1; Ctrl-C exits with 130. Launch with
torchrun for multi-GPU configs (pp_size * cp_size > 1).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import NoReturn

from magi.config import ConfigError, MagiConfig, check_paths, check_world_size, load_config
from magi.request import MODES, RequestError, check_prompts_fit, check_text, read_prompt_file, shorten_paths, shown_path

ATTENTION_BACKENDS = ("auto", "sdpa", "flex", "flash")  # magi.attention.BACKEND_CHOICES


# A problem with the command line, its files or the config (magi.request's rules): one line, exit 2.
UsageError = RequestError


class _PipelineMissing(Exception):
    """This build of magi has no magi.pipeline (or a module it needs): nothing can be generated."""


def _pipeline() -> ModuleType:
    """magi.pipeline, imported on first use (it pulls in torch and the models)."""
    try:
        return importlib.import_module("magi.pipeline")
    except ModuleNotFoundError as err:
        if not (err.name or "").startswith("magi"):
            raise
        raise _PipelineMissing(err.name) from None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse prints the whole usage block; one line is easier to read in logs.
        raise UsageError(f"{message} (see --help)")


@dataclass(frozen=True)
class Request:
    """One validated generation request, in the keywords MagiPipeline.generate takes."""

    mode: str
    prompt: str | list[str]
    output_path: str
    image_path: str | None = None
    prefix_video_path: str | None = None
    save_tensors: str | None = None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m magi.infer",
        description=(
            "Generate a video with MAGI-1. t2v: text to video; i2v: continue an image "
            "(--image_path); v2v: continue a video (--prefix_video_path). Multi-GPU configs "
            "(pp_size * cp_size > 1) run under torchrun with that many processes."
        ),
        epilog=(
            "example: python -m magi.infer --config example/4.5B/4.5B_distill_config.json "
            "--mode t2v --prompt 'A cat walks on a fence' --output_path cat.mp4"
        ),
    )
    parser.add_argument("--config_file", "--config", dest="config_file", required=True, metavar="JSON",
                        help="config in the official JSON format (e.g. example/4.5B/4.5B_base_config.json)")
    parser.add_argument("--mode", choices=MODES, help="t2v, i2v or v2v (required unless --resume)")
    parser.add_argument("--prompt", action="append", metavar="TEXT",
                        help="text prompt; repeat it to give chunk 0, chunk 1, ... their own prompt "
                             "(the last one holds for the remaining chunks)")
    parser.add_argument("--prompt_file", metavar="JSON",
                        help='per-chunk prompts: a JSON list of strings, or a timeline '
                             '[{"chunk": 0, "prompt": "..."}, {"chunk": 3, "prompt": "..."}]')
    parser.add_argument("--image_path", metavar="IMAGE", help="i2v: the image the video starts from")
    parser.add_argument("--prefix_video_path", metavar="VIDEO", help="v2v: the video to continue")
    parser.add_argument("--output_path", required=True, metavar="MP4", help="where to write the .mp4")
    overrides = parser.add_argument_group("overrides of runtime_config")
    overrides.add_argument("--seed", type=int, help="random seed")
    overrides.add_argument("--num_frames", type=int,
                           help="frames to generate (rounded up to whole chunks); with --resume, the video's new "
                                "length (docs/CLI.md: which lengths a stopped run can take)")
    overrides.add_argument("--video_size_h", type=int, help="height in pixels (multiple of 16)")
    overrides.add_argument("--video_size_w", type=int, help="width in pixels (multiple of 16)")
    overrides.add_argument("--num_steps", type=int, help="denoising steps per chunk (multiple of window_size)")
    parser.add_argument("--compat", choices=("magi", "official"), default="magi",
                        help="'official' restores every official behaviour magi changes on purpose "
                             "(v2v prefix selection, i2v resize, output frame rounding); default magi")
    parser.add_argument("--save_tensors", metavar="PATH.safetensors",
                        help="also save the final latent and frames to this safetensors file (spilled to disk "
                             "chunk by chunk, assembled at the end); with --resume, the "
                             "interrupted run's file at this path is continued, else it holds only "
                             "the chunks generated after the resume (a warning says so)")
    parser.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available)")
    state = parser.add_argument_group("resumable runs (magi.state; docs/ARCHITECTURE.md)")
    state.add_argument("--save_state", metavar="STATE",
                       help="write the generation state here every --save_every chunks and when "
                            "stopped (Ctrl-C, SIGTERM, SIGHUP); continue with --resume STATE. Each "
                            "chunk is also kept as its own mp4 in the folder STATE.chunks/ and the "
                            "output is joined from them, so even a kill -9 ends in one playable mp4")
    state.add_argument("--save_every", type=int, default=1, metavar="K",
                       help="chunks between state saves (default 1)")
    state.add_argument("--resume", metavar="STATE",
                       help="continue the run saved in STATE (same --config; --mode and prompts come "
                            "from the state); --output_path is joined from STATE.chunks/ (the earlier "
                            "chunks) and the new ones; without that folder the new chunks are "
                            "appended to --output_path when it holds the earlier run's video")
    state.add_argument("--extend", metavar="STATE",
                       help="continue the finished run saved in STATE by --num_frames frames with new "
                            "--prompt(s), from its exact clean latents (v2v conditioning); appended to "
                            "--output_path when it holds that run's video")
    state.add_argument("--steer", metavar="FILE",
                       help="steer the run while it goes on: each line appended to FILE, "
                            '{"from_chunk": K, "prompt": "TEXT"}, gives the generated chunks >= K that '
                            "have not started denoising the prompt TEXT (lines already there apply from "
                            "the start; FILE need not exist yet; a bad line is reported and skipped)")
    perf = parser.add_argument_group("speed and memory (same video either way; docs/PERFORMANCE.md)")
    perf.add_argument("--attention_backend", choices=ATTENTION_BACKENDS, default="auto",
                      help="attention kernel: auto (flash-attn on CUDA for bf16/fp16 when installed, "
                           "else flex on CUDA, else sdpa), sdpa, flex or flash; default auto")
    perf.add_argument("--offload", action="store_true",
                      help="keep the DiT in host memory and stream its layers to the GPU one at a time "
                           "(for GPUs too small for the model; slower); also keeps the VAE on the host")
    perf.add_argument("--vae_offload", choices=("auto", "on", "off"), default="auto",
                      help="keep the VAE in host memory except while it encodes/decodes "
                           "(auto: on with --offload)")
    perf.add_argument("--skip_memory_check", action="store_true",
                      help="on CUDA, load even when the memory estimate (python -m magi.plan) says the run "
                           "does not fit the GPU")
    perf.add_argument("--compile", action="store_true",
                      help="torch.compile each transformer layer (compiles on the first chunk)")
    return parser


def _prompt(args: argparse.Namespace, video: tuple[int, int] | None = None) -> str | list[str]:
    if args.prompt and args.prompt_file:
        raise UsageError("give either --prompt or --prompt_file, not both")
    if args.prompt_file:
        prompts = read_prompt_file(args.prompt_file, video)
    elif not args.prompt:
        raise UsageError("--prompt is required (or --prompt_file for per-chunk prompts)")
    elif not all(p.strip() for p in args.prompt):
        raise UsageError("--prompt must not be empty")
    else:
        prompts = [check_text(text, "--prompt" if len(args.prompt) == 1 else f"--prompt {i + 1}", "--prompt")
                   for i, text in enumerate(args.prompt)]
    if video is not None:
        check_prompts_fit(len(prompts), video[0], video[1], "--prompt_file" if args.prompt_file else "--prompt")
    return prompts[0] if not args.prompt_file and len(prompts) == 1 else prompts


def _existing_file(flag: str, path: str | None, mode: str) -> str:
    if path is None:
        raise UsageError(f"--mode {mode} needs {flag}")
    if not Path(path).is_file():
        raise UsageError(f"{flag} {path} does not exist (relative paths start at {shown_path(Path.cwd())})")
    return path


def _inputs(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """The mode's input files (image, prefix video) and the output names, checked; reads nothing."""
    mode = args.mode
    image = _existing_file("--image_path", args.image_path, mode) if mode == "i2v" else None
    prefix = _existing_file("--prefix_video_path", args.prefix_video_path, mode) if mode == "v2v" else None
    if mode != "i2v" and args.image_path:
        raise UsageError(f"--image_path is only used with --mode i2v (got --mode {mode})")
    if mode != "v2v" and args.prefix_video_path:
        raise UsageError(f"--prefix_video_path is only used with --mode v2v (got --mode {mode})")
    if Path(args.output_path).suffix.lower() != ".mp4":
        raise UsageError(f"--output_path {args.output_path} must end in .mp4")
    if os.path.isdir(args.output_path):  # os.path: False, not OSError, for a too-long name
        raise UsageError(f"--output_path {args.output_path} is a directory; give a file name ending in .mp4")
    if args.save_tensors and Path(args.save_tensors).suffix != ".safetensors":
        raise UsageError(f"--save_tensors {args.save_tensors} must end in .safetensors")
    if args.save_tensors and os.path.isdir(args.save_tensors):
        raise UsageError(f"--save_tensors {args.save_tensors} is a directory; give a file name ending in .safetensors")
    if prefix is not None and _same_file(args.output_path, prefix):
        raise UsageError(f"--output_path {args.output_path} is the --prefix_video_path: writing it would "
                         "overwrite the input video; choose another --output_path")
    return image, prefix


def _same_file(a: str, b: str) -> bool:
    """The same file after resolving links (hard links too, when both exist)."""
    try:
        if os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b):
            return True
        return Path(a).resolve() == Path(b).resolve()
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop
        return False


def _config_error(err: ConfigError) -> UsageError:
    """The one-line (<= 200 characters) usage error of a config problem: a missing checkpoint names
    its first missing part and how many more (the whole list: the library's exception, docs/CLI.md)."""
    problems = getattr(err, "problems", ())
    if not problems:
        return UsageError(str(err))
    where, problem = Path(err.where).name, shorten_paths(problems[0])
    first = problem if len(problem) <= 110 else problem.split(" (")[0][:130]  # the parenthesis: docs
    more = f" (+{len(problems) - 1} more missing)" if len(problems) > 1 else ""
    return UsageError(f"{where}: {first}{more}; get them: python -m magi.download <model>"[:200])


def _config(args: argparse.Namespace) -> MagiConfig:
    cfg = load_config(args.config_file)
    names = ("seed", "num_frames", "video_size_h", "video_size_w", "num_steps")
    overrides = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    if overrides:
        try:
            cfg = cfg.replace(runtime=dataclasses.replace(cfg.runtime, **overrides))
        except ConfigError as err:
            shown = " ".join(f"--{k} {v}" for k, v in overrides.items())
            raise UsageError(f"with {shown}: {err}") from None
    check_world_size(cfg, int(os.environ.get("WORLD_SIZE", "1") or 1))
    check_paths(cfg)
    return cfg


def _budget(cfg: MagiConfig, mode: str, compat: str) -> tuple[int, int]:
    """Refuse a request that cannot fit this machine (magi.budget); (generated chunks, num_frames)."""
    from magi import budget

    num_frames = cfg.runtime.num_frames
    try:
        est = budget.check_request(cfg, mode, num_frames, budget.prefix_frames_upper_bound(cfg, mode, compat),
                                   compat=compat, flag_prefix="--")
    except ValueError as err:
        raise UsageError(str(err)) from None
    return est.generated_chunks, num_frames


def _device(name: str | None) -> str:
    try:
        return str(_pipeline().resolve_device(name, label="--device"))
    except ValueError as err:
        raise UsageError(str(err)) from None


def _check_attention(name: str, device: str, cfg: MagiConfig) -> None:
    """An --attention_backend that cannot run here fails now, before any model loads."""
    from magi.attention import check_backend

    try:
        check_backend(name, device, cfg.model.dtype)
    except ValueError as err:
        raise UsageError(f"--attention_backend {name}: {err}") from None


def _check_files(cfg: MagiConfig) -> None:
    """Check special_tokens.npz (when the switched-on special tokens need it), the DiT checkpoint
    (index, keys, shapes, dtypes: headers only) and the T5 folder before any model loads.

    The check is the pipeline's (``check_files``), so the CLI and the API agree.
    """
    try:
        _pipeline().check_files(cfg)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(str(err).strip().splitlines()[0]) from None


def _check_output(flag: str, path: str | None, probe_mp4: bool = False) -> None:
    """Create the output's folder and (mp4) prove a video can be written there, before any model loads."""
    if path is None:
        return
    target = Path(path)
    blocker = next((p for p in target.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise UsageError(f"{flag} {path}: {shown_path(blocker)} is a file, not a folder; choose another path")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"{flag} {path}: cannot create the folder {target.parent} "
                         f"({err.strerror or type(err).__name__})") from None
    if probe_mp4:
        from magi.video_io import Mp4Writer

        try:
            Mp4Writer(target, 24).abort()  # writes and removes its temporary file; nothing else
        except (ValueError, OSError) as err:
            raise UsageError(f"{flag} {path}: {err}") from None
    else:
        _probe_file(flag, target)


def _probe_file(flag: str, target: Path) -> None:
    """Prove a file can be created where ``target`` goes: create it (or, when it exists, a probe
    beside it) and remove it again, so a read-only folder fails now and not after the run."""
    if os.path.isdir(target):
        raise UsageError(f"{flag} {target} is a directory; give a file name")
    probe = target if not os.path.lexists(target) else target.parent / f".magi-probe-{os.getpid()}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        os.unlink(probe)
    except OSError as err:
        raise UsageError(f"{flag} {target}: cannot create a file in {target.parent} "
                         f"({err.strerror or type(err).__name__}); choose a writable folder") from None


def _check_inputs(request: Request, cfg: MagiConfig, compat: str) -> None:
    """Decode the start image, or the prefix video's first frames, now rather than after the models load."""
    from magi import video_io

    rt = cfg.runtime
    size = (rt.video_size_w, rt.video_size_h)
    try:
        if request.image_path is not None:
            video_io.load_image(request.image_path, size, compat=compat)
        if request.prefix_video_path is not None:
            # a few frames at the runtime fps: enough to see it decodes and is long enough
            head = video_io.load_video(request.prefix_video_path, rt.fps, size, compat=compat,
                                       max_frames=rt.temporal_downsample_factor)
            video_io.select_prefix_frames(head, rt.temporal_downsample_factor, compat=compat,
                                          temporal_factor=rt.temporal_downsample_factor)
    except (ValueError, OSError) as err:
        flag = "--image_path" if request.image_path is not None else "--prefix_video_path"
        raise UsageError(f"{flag}: {err}") from None


def prepare(argv: Sequence[str] | None = None) -> tuple[MagiConfig, Request, argparse.Namespace]:
    """Parse and check everything the run needs; loads no model.

    Raises:
        UsageError: one line describing the problem.
    """
    args = build_parser().parse_args(argv)
    if args.save_every < 1:
        raise UsageError(f"--save_every must be >= 1 (chunks between state saves), got {args.save_every}")
    if args.resume is not None and args.extend is not None:
        raise UsageError("give either --resume (finish a stopped run) or --extend (continue a finished one)")
    if args.resume is not None:
        return _prepare_resume(args)
    if args.extend is not None:
        return _prepare_extend(args)
    if args.mode is None:
        raise UsageError("--mode is required (t2v, i2v or v2v) unless --resume is given")
    try:
        image, prefix = _inputs(args)
        cfg = _config(args)
    except ConfigError as err:  # includes CheckpointNotFoundError
        raise _config_error(err) from None
    args.device = _device(args.device)
    _check_attention(args.attention_backend, args.device, cfg)
    if args.offload and cfg.engine.pp_size * cfg.engine.cp_size > 1:
        raise UsageError("--offload works in a single process only; drop it for multi-GPU configs")
    # the video's chunk count bounds a --prompt_file timeline: prompts are read after the budget
    video = _budget(cfg, args.mode, args.compat)
    prompt = _prompt(args, video)
    request = Request(args.mode, prompt, args.output_path, image, prefix, args.save_tensors)
    _check_files(cfg)
    _check_inputs(request, cfg, args.compat)
    _check_output("--output_path", request.output_path, probe_mp4=True)
    _check_output("--save_tensors", request.save_tensors)
    _check_output("--save_state", args.save_state)
    _check_steer(args, cfg, video[0])
    return cfg, request, args


def _check_steer(args: argparse.Namespace, cfg: MagiConfig, chunks: int | None) -> None:
    """--steer FILE: one process only (every rank would have to apply each edit at the same step),
    a folder that exists, and the lines it already holds well formed."""
    if args.steer is None:
        return
    from magi.steer_file import check_file

    if cfg.engine.pp_size * cfg.engine.cp_size > 1:
        raise UsageError("--steer works in a single process only; drop it for multi-GPU configs")
    if Path(args.steer).is_dir():
        raise UsageError(f"--steer {args.steer} is a folder; give a file (it need not exist yet)")
    if not Path(args.steer).parent.resolve().is_dir():
        raise UsageError(f"--steer {args.steer}: the folder {Path(args.steer).parent} does not exist")
    try:
        check_file(args.steer, chunks)
    except ValueError as err:
        raise UsageError(str(err)) from None


def _open_state(args: argparse.Namespace, flag: str, path: str, finished: bool) -> tuple[MagiConfig, object]:
    """Config, file checks and the state of --resume / --extend, checked before any model loads:
    against this config and checkpoint, and --output_path against the state's frames."""
    if Path(args.output_path).suffix.lower() != ".mp4":
        raise UsageError(f"--output_path {args.output_path} must end in .mp4")
    try:
        cfg = _config(args)
    except ConfigError as err:
        raise _config_error(err) from None
    args.device = _device(args.device)
    _check_attention(args.attention_backend, args.device, cfg)
    _check_files(cfg)
    pipeline = _pipeline()
    args.earlier_frames = 0  # frames of the video --output_path holds, continued by this run
    try:
        state, _ = pipeline.open_state(path, pipeline.state_identity(cfg, args.compat), finished=finished)
        if Path(args.output_path).is_file():  # (a missing one gets the new chunks only)
            from magi.state import video_frames

            args.earlier_frames = video_frames(state)  # an extended video counts the one it extends
            pipeline.check_earlier_video(args.output_path, args.earlier_frames, path)
    except ValueError as err:  # StateError is a ValueError
        raise UsageError(f"{flag}: {err}") from None
    for name, value in (("--save_state", args.save_state), ("--save_tensors", args.save_tensors)):
        _check_output(name, value)
    _check_output("--output_path", args.output_path, probe_mp4=True)
    return cfg, state


def _prepare_extend(args: argparse.Namespace) -> tuple[MagiConfig, Request, argparse.Namespace]:
    """--extend STATE: a v2v request whose prefix is the finished state's clean latents."""
    if args.mode not in (None, "v2v") or args.image_path or args.prefix_video_path:
        raise UsageError("--extend continues the saved video (v2v from its latents); drop --mode, "
                         "--image_path and --prefix_video_path")
    cfg, args.extend_state = _open_state(args, "--extend", args.extend, finished=True)
    args.mode = "v2v"
    video = _budget(cfg, args.mode, args.compat)
    prompt = _prompt(args, video)
    _check_steer(args, cfg, video[0])
    return cfg, Request("v2v", prompt, args.output_path, save_tensors=args.save_tensors), args


def _prepare_resume(args: argparse.Namespace) -> tuple[MagiConfig, Request, argparse.Namespace]:
    """--resume STATE: mode, prompts and inputs come from the state."""
    if args.mode or args.prompt or args.prompt_file or args.image_path or args.prefix_video_path:
        raise UsageError("--resume takes the mode, prompts and inputs from the state; drop --mode, "
                         "--prompt, --prompt_file, --image_path and --prefix_video_path")
    cfg, state = _open_state(args, "--resume", args.resume, finished=False)
    _check_resume_flags(args, state, cfg)
    args.mode, args.resume_state = state.meta["mode"], state
    _check_steer(args, cfg, None)
    return cfg, Request(args.mode, state.meta["prompts"], args.output_path, save_tensors=args.save_tensors), args


def _check_resume_flags(args: argparse.Namespace, state: object, cfg: MagiConfig) -> None:
    """--seed cannot change on resume (the noise is the state's): the state's own value is fine,
    another one is an error naming the flag. --num_frames is applied by the library's rule
    (``magi.prepare.resume_length``: more frames while the plan still agrees, never fewer than
    written). Size and steps are config fields: the state's identity check names them."""
    meta = state.meta
    if args.seed is not None and args.seed != meta["seed"]:
        raise UsageError(f"--seed {args.seed}: a resumed run keeps its seed ({meta['seed']}); drop --seed")
    if args.num_frames is None:
        return
    from magi.prepare import resume_length

    try:
        chunks, _ = resume_length(state, cfg.runtime, args.num_frames, "--num_frames")
    except ValueError as err:
        raise UsageError(str(err)) from None
    if chunks > meta["chunk_num"]:  # the longer video's noise must fit this machine
        _budget(cfg, meta["mode"], args.compat)


def _extended(result: object, args: argparse.Namespace) -> str:
    """After --extend: the frames added and the video's total."""
    from magi.state import video_frames

    if not result.frames_written:
        return "extend: no frames added"
    if result.output_path is not None and args.earlier_frames:
        total = args.earlier_frames + result.frames_written
        return f"extended by {result.frames_written} frames: {result.output_path} now holds {total} frames"
    return (f"extended by {result.frames_written} frames, written alone to {result.output_path} "
            f"(the video it continues has {video_frames(args.extend_state)} frames)")


def _generate(cfg: MagiConfig, request: Request, args: argparse.Namespace) -> int:
    from magi.cli import return_freed_memory, show_log, stop_on_signals
    from magi.distributed import fail_fast, shutdown
    from magi.generation import Control

    MagiPipeline = _pipeline().MagiPipeline
    vae_offload = {"auto": None, "on": True, "off": False}[args.vae_offload]
    show_log()
    return_freed_memory()  # a long run's resident set then follows its live tensors (cli.py)
    control, steer = Control(), contextlib.nullcontext()
    if args.steer is not None:
        from magi.steer_file import SteerFile

        steer = SteerFile(args.steer, control, warn=_warn)
    with fail_fast(), steer:  # an error on one rank stops the others at once
        pipe = MagiPipeline.from_config(cfg, device=args.device, compat=args.compat,
                                        attention_backend=args.attention_backend, offload_blocks=args.offload,
                                        compile=args.compile, vae_offload=vae_offload,
                                        memory_check=not args.skip_memory_check)
        with stop_on_signals(control):  # the first stop signal ends the run after the current step
            result = _run(pipe, cfg, request, args, control)
    if _writes_here():
        print(result.summary(), file=sys.stderr if result.interrupted else sys.stdout, flush=True)
        if args.extend is not None:
            print(_extended(result, args), file=sys.stderr if result.interrupted else sys.stdout, flush=True)
    shutdown()  # ranks leave together (rank 0 may still be closing the mp4); no-op in one process
    return result.exit_status  # 128 + signal when stopped by Ctrl-C (130), SIGTERM (143), SIGHUP (129)


def _run(pipe: object, cfg: MagiConfig, request: Request, args: argparse.Namespace, control: object) -> object:
    """The generate / resume / extend call the flags ask for (progress=True: a bar on rank 0)."""
    if args.extend is not None:
        return pipe.extend(args.extend_state, request.prompt, cfg.runtime.num_frames, request.output_path,
                           progress=True, save_state=args.save_state, save_every=args.save_every,
                           save_tensors=request.save_tensors, control=control)
    if args.resume is not None:
        earlier = segments_folder(args.resume)
        return pipe.resume(args.resume_state, request.output_path, progress=True,
                           save_state=args.save_state or args.resume, save_every=args.save_every,
                           save_tensors=request.save_tensors, num_frames=args.num_frames,
                           segments=earlier if earlier.is_dir() else None, control=control)
    segments = None if args.save_state is None else segments_folder(args.save_state)
    return pipe.generate(**dataclasses.asdict(request), progress=True, save_state=args.save_state,
                         save_every=args.save_every, segments=segments, control=control)


def _warn(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _writes_here() -> bool:
    """Rank 0 (or the only process) reports the run."""
    return int(os.environ.get("RANK", "0") or 0) == 0


def segments_folder(state_path: str | Path) -> Path:
    """The chunk segments of a run saved with --save_state STATE: the folder STATE.chunks/."""
    return Path(f"{state_path}.chunks")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m magi.infer``; returns the exit status.

    Args:
        argv: the arguments (default sys.argv[1:]).
    """
    try:
        try:
            cfg, request, args = prepare(argv)
        except UsageError as err:  # (only the checks before any model loads are usage errors)
            print(f"error: {_message(err, argv, 200 - 7)}", file=sys.stderr)
            return 2
        return _generate(cfg, request, args)
    except _PipelineMissing as err:
        print(f"error: generation is not available in this build of magi (module {err} is missing)",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # Once generate() runs it handles Ctrl-C itself; this is the import / loading phase.
        print("interrupted before generation started; nothing written", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as err:  # OSError: FileNotFoundError, PermissionError, ...
        if isinstance(err, RuntimeError) and not isinstance(err, _video_write_error()):
            raise  # a bug or a device failure: the traceback is the useful report
        if os.environ.get("MAGI_DEBUG"):
            raise
        hint = " (set MAGI_DEBUG=1 for the traceback)"
        print(f"error: {_message(err, argv, 200 - 7 - len(hint))}{hint}", file=sys.stderr)
        return 1


def _message(err: Exception, argv: Sequence[str] | None, most: int) -> str:
    """One line of at most ``most`` characters: when longer, the long paths it quotes (those given
    on the command line first) are elided in the middle (magi.request.shorten_paths)."""
    from magi.request import one_line

    text = one_line(str(err), 10**6)
    if len(text) > most:
        text = shorten_paths(text, *(sys.argv[1:] if argv is None else argv))
    return one_line(text, most) or type(err).__name__


def _video_write_error() -> type[Exception] | tuple[()]:
    # Only a loaded pipeline can have raised it; a missing one must not be imported just to ask.
    return getattr(sys.modules.get("magi.pipeline"), "VideoWriteError", ())


if __name__ == "__main__":
    status = main()
    if status >= 128:
        # Once a KeyboardInterrupt has passed through one of CPython's C-level PyRun_* calls (as it
        # can during the imports), `python -m` ends the process by SIGINT even though main caught
        # it; leave now so the documented status (128 + signal) is what the caller sees.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)
