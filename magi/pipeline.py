"""MagiPipeline: prompt (+ image / video) -> prefix latents -> chunked denoising -> streamed mp4.

Models are loaded once by ``MagiPipeline.from_config`` and reused across requests: the DiT and the
VAE stay resident; T5 is loaded on ``runtime_config.t5_device`` only to encode new prompts and
freed right after (encoded prompts are remembered, a few at a time). Each chunk is decoded and
written as soon as the sampler finishes it, so memory does not grow with the video length.

t2v / i2v / v2v differ only in the prefix latents and the frame budget:

* t2v: no prefix. i2v: the image is latent frame 0 (P = 1). v2v: the encoded prefix clip
  (P latent frames); its chunks are not part of the output.
* ``compat="magi"`` (default) honours ``num_frames`` exactly: it generates the fewest chunks that
  cover it and trims the last chunk's frames; i2v counts the image position as the first frames;
  the image keeps its aspect ratio (cover + centre crop); v2v continues from the *end* of the
  prefix video (the frames the model can still see); decoded frames are rounded to uint8.
* ``compat="official"`` restores the official behaviour: chunk_num = ceil((num_frames // 4 + P) /
  chunk_width), every frame of every generated chunk is written (t2v 100 -> 120 frames, i2v 96 ->
  120, v2v default -> 109), the image is stretched, v2v uses the first 32 prefix frames, uint8
  conversion in bf16 with truncation.

Legend: C latent channels, T latent frames, H W latent size, F video frames.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from magi import video_io
from magi.budget import chunk_count, decoded_frames
from magi.captions import ChunkCaptions, token_users, zero_tokens
from magi.conditioning import (
    DEFAULT_SPECIAL_TOKEN_PATH,
    SPECIAL_TOKEN_ENV,
    SpecialTokenOptions,
    SpecialTokens,
    load_special_tokens,
)
from magi.config import MagiConfig, check_paths, load_config
from magi.models.kv_cache import KVCache
from magi.models.vae import ViTVAE, tile_spec_for_fps
from magi.sampling.chunks import ChunkPlan, Step
from magi.sampling.denoise import SamplerSettings, denoise
from magi.sampling.noise import SPILL_BYTES, InitialNoise
from magi.generation import (
    STOP_SIGNALS,
    Control,
    Generation,
    GenerationResult,
    Run,
    StepInfo,
    VideoChunk,
    _graceful_stop,
    _step_hook,
    _Stop,
    _stop_aware,
    _StopRequested,
    whole_number,
)
from magi.sinks import (
    Outputs,
    SegmentSink,
    StateSaver,
    VideoWriteError,
    check_earlier_video,
    check_not_the_input,
    check_save_path,
    progress_bar,
)
from magi.state import GenerationState, StateError

__all__ = [  # the public names; the steering / result / sink types live in magi.generation / magi.sinks
    "MagiPipeline", "Control", "Generation", "GenerationResult", "StepInfo", "VideoChunk",
    "VideoWriteError", "NonFiniteLatentError", "StateSaver", "STOP_SIGNALS", "MODES", "COMPAT_MODES",
    "check_files", "chunk_count", "decoded_frames", "find_special_tokens", "resolve_device",
]  # fmt: skip

MODES = ("t2v", "i2v", "v2v")
COMPAT_MODES = ("magi", "official")
PROMPT_CACHE_SIZE = 8  # encoded prompts remembered across requests
# Clean chunks a state keeps for extend: what a new chunk can still see (max(kv range) - 1 with
# the shipped (5, 4, 3, 2)); the first generated chunks of an extension attend to them.
TAIL_CHUNKS = 4


class NonFiniteLatentError(ValueError):
    """A chunk's latent came out of the sampler with NaN / Inf values; nothing is written."""


def _check_finite(latent: torch.Tensor, index: int, cfg: MagiConfig) -> None:
    """Fail on a non-finite clean latent (one reduction per chunk) instead of writing black frames."""
    if bool(torch.isfinite(latent).all()):
        return
    bad = int((~torch.isfinite(latent)).sum())
    raise NonFiniteLatentError(
        f"chunk {index} came out of the sampler with {bad} NaN/Inf latent values: the DiT weights "
        f"in {cfg.runtime.load} likely hold non-finite values (a corrupt or wrongly converted "
        "checkpoint), or the model dtype overflowed; nothing was written"
    )


# ------------------------------------------------------------------------------ run settings
def resolve_device(device: torch.device | str | None, label: str = "device") -> torch.device:
    """The device a pipeline runs on, checked to exist on this machine.

    Args:
        device: "cuda", "cuda:N", "cpu" or a ``torch.device``; None picks CUDA when available.
        label: how the caller names the setting in the error ("device", "--device").

    Raises:
        ValueError: one line naming the device and what to use instead.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        found = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{label} {device} is not a device; use cuda, cuda:N or cpu") from None
    if found.type not in ("cuda", "cpu"):
        raise ValueError(f"{label} {device}: magi runs on cuda, cuda:N or cpu")
    if found.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{label} {device}: CUDA is not available on this machine; use cpu")
    if found.type == "cuda" and found.index is not None and found.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise ValueError(f"{label} {device}: this machine has {count} CUDA device(s) (cuda:0 .. cuda:{count - 1})")
    return found


def find_special_tokens(cfg: MagiConfig) -> Path:
    """Where special_tokens.npz is for this config (read when a special token is on; PAD_HQ and
    PAD_DURATION are by default).

    Looks at $SPECIAL_TOKEN_PATH, else ``example/assets/special_tokens.npz`` under the working
    directory (the official place), else next to the config file (where ``magi.download`` puts it).

    Raises:
        FileNotFoundError: one line naming the places looked at and how to get the file.
    """
    env = os.environ.get(SPECIAL_TOKEN_ENV)
    if env:
        if not Path(env).is_file():
            raise FileNotFoundError(f"{SPECIAL_TOKEN_ENV}={env} does not exist; fix it or unset it")
        return Path(env)
    official = Path.cwd() / DEFAULT_SPECIAL_TOKEN_PATH
    if official.is_file():
        return official
    # cfg.source names a file only for configs read from one (presets and dicts say otherwise).
    if cfg.source and Path(cfg.source).is_file():
        beside = Path(cfg.source).resolve().parent / "special_tokens.npz"
        if beside.is_file():
            return beside
    raise FileNotFoundError(
        f"special_tokens.npz not found: set {SPECIAL_TOKEN_ENV}, put it at {DEFAULT_SPECIAL_TOKEN_PATH} "
        "under the working directory or next to the config file, or get it with "
        "`python -m magi.download <model>`"
    )


def check_special_tokens(cfg: MagiConfig) -> Path | None:
    """Find special_tokens.npz now if the switched-on special tokens will read it.

    The switches are the official env vars (PAD_HQ and PAD_DURATION are on unless set to 0;
    ``SpecialTokenOptions``); a $SPECIAL_TOKEN_PATH that is set is checked either way.

    Returns:
        The file, or None when no switched-on token needs it.

    Raises:
        FileNotFoundError: one line naming what was looked for and which tokens need it.
    """
    options = SpecialTokenOptions.from_env()
    users = token_users(options)
    if not users and not os.environ.get(SPECIAL_TOKEN_ENV):
        return None
    try:
        return find_special_tokens(cfg)
    except FileNotFoundError as err:
        if not users:
            raise
        raise FileNotFoundError(f"{err} (needed for {', '.join(users)}; PAD_HQ and PAD_DURATION "
                                "are on unless set to 0)") from None  # fmt: skip


def check_files(cfg: MagiConfig) -> None:
    """Start-up check of every file a run reads, before minutes of loading (headers only).

    Special tokens (when switched on), the DiT checkpoint (index, keys, shapes, dtypes) and the
    T5 folder; each fault is one ``ValueError`` / ``FileNotFoundError`` line naming the file.
    """
    from magi.checkpoint import check_dit_checkpoint
    from magi.conditioning import check_special_tokens_file
    from magi.models.text_encoder import check_t5_folder

    tokens = check_special_tokens(cfg)
    if tokens is not None:
        check_special_tokens_file(tokens)
    check_dit_checkpoint(cfg)
    if cfg.runtime.t5_pretrained:
        check_t5_folder(cfg.runtime.t5_pretrained)


def _prompt_list(prompt: str | Sequence[str]) -> list[str]:
    if not isinstance(prompt, (str, list, tuple)):
        raise ValueError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError("prompt must be a non-empty string or a non-empty list of non-empty strings")
    return prompts


# ---------------------------------------------------------------------------------- pipeline
class MagiPipeline:
    """MAGI-1 text/image/video-to-video generation, streamed chunk by chunk.

    Build with :meth:`from_config`; call :meth:`generate` (writes an mp4) or :meth:`stream`
    (yields each chunk's frames as soon as it is clean).

    Args:
        config: the run's config.
        dit: the loaded DiT (or a parallelized one; same forward on every rank).
        vae: the loaded VAE (bf16, as officially).
        device: where the DiT runs; latents and noise live here.
        compat: "magi" (default) or "official" (see the module docstring).
        mesh: the process mesh for multi-GPU runs (None: single process).
        vae_offload: keep the VAE's weights in host memory and copy them to ``device`` only
            while it encodes a prefix or decodes a chunk (``magi.offload.HostResident``).
        noise_spill_bytes: initial noise larger than this is kept in a temporary file and read
            chunk by chunk (``magi.sampling.noise``); same values either way.
    """

    def __init__(
        self,
        config: MagiConfig,
        dit: nn.Module,
        vae: ViTVAE,
        *,
        device: torch.device | str = "cpu",
        compat: str = "magi",
        mesh: object | None = None,
        vae_offload: bool = False,
        noise_spill_bytes: int = SPILL_BYTES,
    ) -> None:
        if compat not in COMPAT_MODES:
            raise ValueError(f"compat must be one of {COMPAT_MODES}, got {compat!r}")
        self.config, self.dit, self.vae = config, dit, vae
        self.device, self.compat, self.mesh = torch.device(device), compat, mesh
        self.noise_spill_bytes = noise_spill_bytes
        self._vae_host = None
        if vae_offload:
            from magi.offload import HostResident

            self._vae_host = HostResident(vae, self.device)
        self._prompt_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._special_tokens: SpecialTokens | None = None

    @classmethod
    def from_config(
        cls,
        config: str | Path | MagiConfig,
        device: torch.device | str | None = None,
        compat: str = "magi",
        *,
        attention_backend: str = "auto",
        offload_blocks: bool = False,
        compile: bool | dict = False,
        vae_offload: bool | None = None,
        noise_spill_bytes: int = SPILL_BYTES,
    ) -> "MagiPipeline":
        """Load the DiT and the VAE named by a config (T5 is loaded per new prompt, then freed).

        Memory and speed options (docs/PERFORMANCE.md §5); none changes the result: each gives
        the same final latent as the plain run (``tests/test_pipeline.py``).

        Args:
            config: an official-format JSON file or a loaded ``MagiConfig``. Relative checkpoint
                paths are resolved against the working directory, as officially; missing DiT, T5
                or VAE checkpoints are reported together (``CheckpointNotFoundError``) before
                anything loads. special_tokens.npz: see ``find_special_tokens``.
            device: "cuda", "cuda:N" or "cpu" (default: CUDA when available); one that this
                machine lacks is a one-line ``ValueError``. Under torchrun with pp_size * cp_size
                > 1 each rank uses its own GPU.
            compat: "magi" (default) or "official".
            attention_backend: "auto" (flash-attn on CUDA for bf16/fp16 when installed, else
                FlexAttention on CUDA, else SDPA), "sdpa", "flex" or "flash". Checked before any
                model loads; an unavailable choice raises a one-line ``ValueError``. It sets the
                process-wide default of ``magi.attention``.
            offload_blocks: load the DiT into host memory and stream its transformer layers to
                the device one at a time (``magi.offload.offload_blocks``; single process only).
                Saves all but ~2 layers of DiT weights on the device, costs one host-to-device
                copy of the layer stack per DiT pass.
            compile: ``torch.compile`` each transformer layer (``magi.compile.compile_blocks``);
                a dict is passed to ``torch.compile`` as keywords (e.g. ``{"backend": "eager"}``).
            vae_offload: keep the VAE in host memory except while it encodes / decodes. Default
                (None): on with ``offload_blocks`` (the low-memory setup), off otherwise, since on
                its own it saves ~1.1 GiB for one 1.1 GiB copy per decoded chunk.
            noise_spill_bytes: initial noise above this size lives in a temporary file, so host
                memory does not grow with the video length (default 64 MiB: ~21 chunks at
                720x720, ~12 at 720x1280).
        """
        from magi.models.vae import load_vae

        cfg = config if isinstance(config, MagiConfig) else load_config(config)
        check_paths(cfg)  # every missing checkpoint at once, before minutes of loading
        device = resolve_device(device)
        _check_options(cfg, device, attention_backend, offload_blocks, compile)
        check_files(cfg)
        dit, mesh, device = _build_dit(cfg, device, offload_blocks)
        if compile:
            from magi.compile import compile_blocks

            compile_blocks(dit, **(compile if isinstance(compile, dict) else {}))
        keep_vae_on_host = offload_blocks if vae_offload is None else vae_offload
        vae_device = torch.device("cpu") if keep_vae_on_host else device
        vae = load_vae(cfg.runtime.vae_pretrained, vae_device, dtype=torch.bfloat16)
        return cls(cfg, dit, vae, device=device, compat=compat, mesh=mesh,
                   vae_offload=keep_vae_on_host, noise_spill_bytes=noise_spill_bytes)  # fmt: skip

    # ---- requests ----------------------------------------------------------------------------
    def stream(
        self,
        mode: str,
        prompt: str | Sequence[str],
        image_path: str | Path | None = None,
        prefix_video_path: str | Path | None = None,
        *,
        seed: int | None = None,
        num_frames: int | None = None,
        callback: Callable[[StepInfo], None] | None = None,
        noise: torch.Tensor | None = None,
        per_chunk_noise: bool = False,
        control: Control | None = None,
    ) -> Generation:
        """Generate a video and yield each chunk's frames as soon as the chunk is clean.

        The request is checked and prepared (prompts encoded, prefix encoded) here; the chunks
        are denoised as the returned handle is iterated (``for chunk in pipe.stream(...)``).

        Steering: ``handle.set_prompt(from_chunk, text)`` (callable from any thread) changes the
        prompt of the chunks that have not entered the denoising window yet; ``handle.stop()``
        ends the iteration after the current step. The rule: ``magi.generation.Control``.

        Args:
            mode: "t2v", "i2v" (needs image_path) or "v2v" (needs prefix_video_path).
            prompt: one prompt for the whole video (official), or a list: prompt i for generated
                chunk i, the last one repeating for further chunks.
            image_path: i2v start image.
            prefix_video_path: v2v video to continue.
            seed: seed of the initial noise (default runtime_config.seed).
            num_frames: frames to generate (default runtime_config.num_frames).
            callback: called with a ``StepInfo`` after every sampler step.
            noise: the initial noise [1, C, T, H, W] instead of drawing it from ``seed``.
            per_chunk_noise: draw chunk k's noise alone from seed + k (CPU) instead of the
                official single draw: no host memory or temporary file that grows with the video
                length, but NOT the official noise (the same seed gives a different video).
            control: a ``Control`` to steer / stop it with (default: a new one, as
                ``handle.control``).

        Returns:
            A ``Generation``: iterating it yields a ``VideoChunk`` for every generated chunk, in
            order; ``set_prompt`` steers it, ``close`` stops it.
        """
        run = self._prepare(mode, prompt, image_path, prefix_video_path, seed, num_frames, noise,
                            per_chunk_noise)  # fmt: skip
        return Generation(self, run, callback, control)

    def generate(
        self,
        mode: str,
        prompt: str | Sequence[str],
        image_path: str | Path | None = None,
        prefix_video_path: str | Path | None = None,
        output_path: str | Path | None = None,
        seed: int | None = None,
        num_frames: int | None = None,
        callback: Callable[[StepInfo], None] | None = None,
        save_tensors: str | Path | None = None,
        noise: torch.Tensor | None = None,
        progress: bool = False,
        per_chunk_noise: bool = False,
        save_state: str | Path | None = None,
        save_every: int = 1,
        prefix_latent: torch.Tensor | None = None,
        segments: str | Path | None = None,
        control: Control | None = None,
        on_chunk: Callable[[VideoChunk], None] | None = None,
    ) -> GenerationResult:
        """Generate a video; write it to ``output_path`` chunk by chunk (mp4, runtime fps).

        The mp4 is written to a temporary file next to ``output_path`` and renamed on success; a
        failed run leaves nothing at ``output_path``. Ctrl-C stops after the current step and
        leaves a playable mp4 of the chunks done so far (a second Ctrl-C aborts at once).

        Args:
            mode, prompt, image_path, prefix_video_path, seed, num_frames, callback, noise,
                per_chunk_noise: as for :meth:`stream`.
            output_path: the .mp4 to write (None: generate without writing a video).
            save_tensors: also save ``final_latent`` (float32 [1, C, T, H/8, W/8], the clean
                latents of the generated chunks) and ``video_tchw_uint8`` (the written frames)
                to this .safetensors file (keeps them in memory until the end).
            progress: show a per-chunk progress bar and print a summary (rank 0 only).
            save_state: write the generation state (``magi.state``) to this file every
                ``save_every`` finished chunks, and when the run is stopped (Ctrl-C, SIGTERM,
                SIGHUP); continue it with :meth:`resume`.
            save_every: chunks between state saves.
            prefix_latent: v2v from clean latents [1, C, P, H, W] (VAE latents × scale factor)
                instead of ``prefix_video_path``.
            segments: also write every chunk as its own mp4 into this folder (``SegmentSink``:
                00000.mp4, ...; earlier segments there are removed); ``output_path`` is then
                joined from them (stream copy) at the end or when stopped. With ``save_state`` a
                run killed with ``kill -9`` keeps its video: ``resume(segments=...)`` joins the
                segments it kept with the rest into one mp4.
            control: a ``magi.generation.Control`` to steer (``set_prompt``) or stop the run
                from another thread or the callback.
            on_chunk: called with each ``VideoChunk`` once it is written.

        Returns:
            A ``GenerationResult`` (frames written, timings, peak memory, interrupted flag).
        """
        if prefix_latent is not None and (mode != "v2v" or prefix_video_path is not None):
            raise ValueError("prefix_latent is the v2v prefix: use it with mode v2v and no prefix_video_path")
        if prefix_latent is None:
            _check_mode(mode, image_path, prefix_video_path)
        saver = None if save_state is None else StateSaver(save_state, save_every, noise is None)

        def prepare() -> Run:
            return self._prepare(mode, prompt, image_path, prefix_video_path, seed, num_frames, noise,
                                 per_chunk_noise, prefix_latent)  # fmt: skip

        sink = _Sinks(output_path, segments, 0, on_chunk)
        return self._generate(prepare, sink, prefix_video_path, callback, save_tensors, progress, saver,
                              control=control)  # fmt: skip

    def resume(
        self,
        state: str | Path | GenerationState,
        output_path: str | Path | None = None,
        *,
        callback: Callable[[StepInfo], None] | None = None,
        progress: bool = False,
        save_state: str | Path | None = None,
        save_every: int = 1,
        save_tensors: str | Path | None = None,
        segments: str | Path | None = None,
        control: Control | None = None,
        on_chunk: Callable[[VideoChunk], None] | None = None,
    ) -> GenerationResult:
        """Continue a run from a saved state, bit for bit as if it had never stopped.

        Args:
            state: a state file written by ``generate(save_state=...)`` (or a loaded state).
            output_path: where the remaining chunks go. If it holds the earlier run's video
                (exactly the state's frames), the new chunks are appended to it without
                re-encoding the earlier ones; a missing file gets the remaining chunks only.
            callback, progress: as for :meth:`generate`.
            save_state: keep saving states (default: the file resumed from, when given as a path).
            save_every: chunks between state saves.
            save_tensors: as for :meth:`generate`. When the file there is the one the interrupted
                run wrote (exactly the state's chunks and frames, ending in its clean chunks), it
                is continued, so it holds the whole video; otherwise it holds only the chunks this
                call generates (a warning says so; e.g. after ``kill -9`` no file was written).
            segments: the segment folder the interrupted run wrote (``generate(segments=...)``):
                its segments of the chunks the state covers are kept (later ones, written after
                the last save, are removed), the new chunks join them, and ``output_path`` is
                joined from them all, so one playable mp4 comes out even after ``kill -9``.
            control, on_chunk: as for :meth:`generate`.

        Raises:
            StateError: a damaged or edited state, one from another magi version, config,
                checkpoint or compat mode, or a finished one; an output that does not hold
                the state's frames (resumed twice into the same output).
        """
        loaded, where = open_state(state, self.identity(), finished=False)
        earlier = None
        if segments is None:
            earlier = check_earlier_video(output_path, loaded.meta["frames_done"], where)
        target = save_state if save_state is not None else (None if isinstance(state, GenerationState) else state)
        saver = None if target is None else StateSaver(target, save_every, True)
        sink = _Sinks(output_path, segments, loaded.meta["chunks_done"], on_chunk)
        return self._generate(lambda: self._from_state(loaded), sink, None, callback, save_tensors,
                              progress, saver, append_to=earlier, control=control)  # fmt: skip

    def extend(
        self,
        state: str | Path | GenerationState,
        prompt: str | Sequence[str],
        num_frames: int,
        output_path: str | Path | None = None,
        *,
        seed: int | None = None,
        callback: Callable[[StepInfo], None] | None = None,
        progress: bool = False,
        save_state: str | Path | None = None,
        save_every: int = 1,
        save_tensors: str | Path | None = None,
        segments: str | Path | None = None,
        control: Control | None = None,
        on_chunk: Callable[[VideoChunk], None] | None = None,
    ) -> GenerationResult:
        """Continue a finished video by ``num_frames`` frames with new prompts.

        MAGI's own v2v conditioning, fed with the finished run's exact clean latents (its last
        ``TAIL_CHUNKS`` chunks, kept in the state) instead of re-encoded pixels: the same as
        ``generate("v2v", prompt, prefix_latent=those latents, ...)``.

        Args:
            state: the state a finished ``generate(save_state=...)`` / ``resume`` wrote.
            prompt, num_frames, seed, callback, progress, save_state, save_every, save_tensors:
                as for :meth:`generate` (seed defaults to the config's).
            output_path: the new frames' mp4. When it holds the finished video (exactly its
                frames), the continuation is appended to it (stream copy).
            segments, control, on_chunk: as for :meth:`generate` (the segments are the new
                chunks only; an output holding the finished video is joined with them).

        Raises:
            StateError: a damaged state, another model / compat mode, or an unfinished run
                (resume it first).
        """
        loaded, where = open_state(state, self.identity(), finished=True)
        tail = _state_tail(loaded)
        if not tail:
            raise StateError(f"{where} keeps no clean latents to continue from")
        prefix = torch.cat([t for _, t in tail], dim=2)  # [1, C, P, H, W] float32
        earlier = None
        if output_path is not None and Path(output_path).is_file():
            earlier = check_earlier_video(output_path, loaded.meta["frames_done"], where)
        saver = None if save_state is None else StateSaver(save_state, save_every, True)

        def prepare() -> Run:
            return self._prepare("v2v", prompt, None, None, seed, num_frames, None, prefix_latent=prefix)

        sink = _Sinks(output_path, segments, 0, on_chunk)
        return self._generate(prepare, sink, None, callback, save_tensors, progress, saver,
                              append_to=earlier, control=control)  # fmt: skip

    def _generate(self, prepare: Callable[[], Run], sink: "_Sinks", prefix_video_path: str | Path | None,
                  callback: Callable[[StepInfo], None] | None, save_tensors: str | Path | None,
                  progress: bool, saver: StateSaver | None, append_to: Path | None = None,
                  control: Control | None = None) -> GenerationResult:  # fmt: skip
        """Run a prepared request into the mp4 / segments / tensors / state sinks."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        rt = self.config.runtime
        output_path = sink.output_path
        check_save_path(save_tensors)
        check_not_the_input(output_path, prefix_video_path)
        writer_rank = self._is_writer()
        # Built first so a bad output path fails before any model work; nothing is written yet.
        segments = None
        if sink.segments is not None and writer_rank:
            segments = SegmentSink(sink.segments, rt.fps, keep=sink.keep_segments)
        writer = None
        if output_path and writer_rank:
            target = output_path
            if append_to is not None:  # the new chunks go to a part file, appended at the end
                target = append_to.parent / f".{append_to.name[:150]}.magi-resume-{os.getpid()}.mp4"
            writer = video_io.Mp4Writer(target, rt.fps)
            if segments is not None:  # checked only: the mp4 is joined from the segments
                writer.abort()
                writer = None
        result = GenerationResult(Path(output_path) if output_path and writer_rank else None, fps=rt.fps,
                                  size=(rt.video_size_w, rt.video_size_h))  # fmt: skip
        out = Outputs(writer, result, segments=segments, on_chunk=sink.on_chunk,
                      joined=Path(output_path) if output_path and segments is not None else None)  # fmt: skip
        out.keep_tensors = save_tensors is not None and writer_rank
        stop = _Stop()
        bar = progress_bar(0, False)
        saver = saver if writer_rank else None
        try:
            run = prepare()
            if control is not None:
                control._bind(self, run)
            out.result.chunks_total = len(run.plan.generated_chunks)
            out.result.chunks_done, out.result.frames_written = run.chunks_done, run.frames_done
            if out.keep_tensors and run.chunks_done:  # resumed: the earlier chunks' tensors first
                out.prepend_tensors(Path(save_tensors), run.tail, run.plan.offset, run.chunks_done, run.frames_done)
            bar = progress_bar(out.result.chunks_total, progress and writer_rank)
            bar.update(run.chunks_done)
            # The stop is taken in the step hook, before the next step: the last state saved
            # then matches the chunks in the mp4.
            hook = _stop_aware(callback, stop, self.mesh, control)
            with _graceful_stop(stop), closing(self._run(run, hook, saver)) as chunks:
                for chunk in chunks:
                    out.add(chunk)
                    bar.update(1)
        except (_StopRequested, KeyboardInterrupt):
            out.result.interrupted = True
            out.result.stop_signal = stop.signum or (None if control is not None and control.stopping else signal.SIGINT)
            if saver is not None:
                saver.save()
        except BaseException:
            out.abort()
            raise
        finally:
            bar.close()
        result = out.finish(save_tensors, self.device, append_to)
        if writer_rank and (progress or result.interrupted):
            print(result.summary(), file=sys.stderr if result.interrupted else sys.stdout, flush=True)
        return result

    # ---- internals ---------------------------------------------------------------------------
    def _is_writer(self) -> bool:
        if self.mesh is None:
            return True
        from magi.distributed import is_writer_rank

        return is_writer_rank()

    def _prepare(
        self,
        mode: str,
        prompt: str | Sequence[str],
        image_path: str | Path | None,
        prefix_video_path: str | Path | None,
        seed: int | None,
        num_frames: int | None,
        noise: torch.Tensor | None,
        per_chunk_noise: bool = False,
        prefix_latent: torch.Tensor | None = None,
    ) -> Run:
        """Check the request, encode the prefix and the prompts, plan the chunks (noise: ``_run``).

        ``prefix_latent`` (v2v only): the clean latents [1, C, P, H, W] to continue, instead of
        encoding a prefix video (``extend``).
        """
        rt = self.config.runtime
        if prefix_latent is None:
            _check_mode(mode, image_path, prefix_video_path)
        prompts = _prompt_list(prompt)
        frames = rt.num_frames if num_frames is None else whole_number("num_frames", num_frames)
        if frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {frames}")
        seed = rt.seed if seed is None else whole_number("seed", seed)
        if not -(2**63) <= seed < 2**64:
            raise ValueError(f"seed {seed} does not fit in 64 bits, as torch.manual_seed needs")
        from magi import budget

        # noise file, one chunk's latent / frames: refused now if they cannot fit (magi.budget)
        budget.check_request(self.config, mode, frames, budget.prefix_frames_upper_bound(self.config, mode, self.compat),
                             compat=self.compat, noise_spill_bytes=self.noise_spill_bytes,
                             draw_noise=noise is None and not per_chunk_noise)  # fmt: skip
        if prefix_latent is not None:
            prefix = prefix_latent.to(self.device)
        else:
            prefix = self._prefix_latent(mode, image_path, prefix_video_path)
        p = 0 if prefix is None else prefix.shape[2]
        tile = tile_spec_for_fps(rt.fps, self.compat).frames // rt.temporal_downsample_factor
        chunks = chunk_count(mode, frames, p, rt.chunk_width, compat=self.compat,
                             temporal_factor=rt.temporal_downsample_factor, tile_latents=tile)  # fmt: skip
        settings = SamplerSettings.from_config(self.config)
        plan = settings.plan(chunks, p)
        lat_h, lat_w = rt.video_size_h // 8, rt.video_size_w // 8
        shape = (1, self._latent_channels(), chunks * rt.chunk_width, lat_h, lat_w)
        if noise is not None and per_chunk_noise:
            raise ValueError("give either noise or per_chunk_noise=True, not both")
        if noise is not None and tuple(noise.shape) != shape:
            raise ValueError(f"noise must have shape {shape} for this request, got {tuple(noise.shape)}")
        captions = self._captions(prompts, plan)
        limit = None if self.compat == "official" else frames
        return Run(mode, plan, settings, captions, shape, seed, noise, per_chunk_noise, prefix, limit)

    def _run(self, run: Run, callback: Callable[[StepInfo], None] | None,
             saver: "StateSaver | None" = None) -> Iterator[VideoChunk]:  # fmt: skip
        """Draw the noise, denoise (from run.start_step), decode each clean chunk, trim to the
        frame budget; ``saver`` sees every resume point."""
        plan = run.plan
        cache = KVCache(plan.max_cached_chunks(), offload=self.config.engine.kv_offload)
        # Closed however the run ends (done, error, Ctrl-C, generator dropped): frees the
        # noise's memory or temporary file.
        with self._initial_noise(run) as noise:
            hook = None if callback is None else _step_hook(callback, plan)

            def take_noise(chunk: int) -> torch.Tensor:
                return noise.chunk(chunk).to(self.device)

            def at_step(step: Step, window: dict[int, torch.Tensor]) -> None:
                if saver is not None and step.finished is not None:
                    saver.chunk_done(self._snapshot(run, step.index + 1, window))

            for index, latent in denoise(self.dit, plan, run.settings, run.captions, take_noise,
                                         cache, prefix=run.prefix, callback=hook, start_step=run.start_step,
                                         window=run.window, on_window=at_step):  # fmt: skip
                _check_finite(latent, index, self.config)
                lo, hi = plan.emit_range(index, skip_prefix=run.mode == "v2v")
                frames = self._decode(latent[:, :, lo:hi])
                if run.limit is not None:
                    frames = frames[: max(0, run.limit - run.frames_done)]
                run.frames_done += len(frames)
                run.chunks_done += 1
                run.tail = [*run.tail, (index, latent.detach().float().cpu())][-TAIL_CHUNKS:]
                yield VideoChunk(index, frames, latent)

    # ---- generation state ----------------------------------------------------------------------
    def identity(self) -> dict:
        """What a saved state must share with this pipeline to be resumed here."""
        return state_identity(self.config, self.compat)

    def _snapshot(self, run: Run, next_step: int, window: dict[int, torch.Tensor]) -> "GenerationState":
        """The state after step next_step - 1 (copies of the live window's latents, on CPU)."""
        from magi.state import GenerationState

        caps = run.captions
        meta = {
            "next_step": next_step, "finished": next_step >= run.plan.total_steps,
            "mode": run.mode, "seed": run.seed, "per_chunk_noise": run.per_chunk_noise,
            "noise_shape": list(run.noise_shape), "limit": run.limit,
            "chunk_num": run.plan.chunk_num, "prefix_frames": run.plan.prefix_frames,
            "frames_done": run.frames_done, "chunks_done": run.chunks_done,
            "prompts": caps.texts, "chunk_prompts": caps.chunk_prompts,
            "special_tokens": dataclasses.asdict(caps.options),
            "settings": dataclasses.asdict(run.settings), "identity": self.identity(),
        }  # fmt: skip
        window = {c: t.detach().float().cpu().clone() for c, t in window.items()}
        prefix = None if run.prefix is None else run.prefix.detach().cpu()
        tail = {f"clean.{c}": t for c, t in run.tail}  # what extend continues from
        return GenerationState(meta, window, prefix, caps.emb.cpu(), caps.mask.cpu(), tail)

    def _from_state(self, state: "GenerationState") -> Run:
        """The prepared run that continues ``state`` (no T5, no VAE encode)."""
        m = state.meta
        settings = SamplerSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in m["settings"].items()})
        plan = settings.plan(m["chunk_num"], m["prefix_frames"])
        options = SpecialTokenOptions(**m["special_tokens"])
        null = self.dit.y_embedder.null_caption_embedding.detach()
        captions = ChunkCaptions(state.prompt_emb.to(self.device), state.prompt_mask.to(self.device),
                                 null.to(self.device), self._tokens(options, state.prompt_emb.shape[-1]).to(self.device),
                                 options, m["chunk_prompts"], plan.offset, m["prompts"])  # fmt: skip
        prefix = None if state.prefix is None else state.prefix.to(self.device)
        window = {c: t.to(self.device) for c, t in state.window.items()}
        return Run(m["mode"], plan, settings, captions, tuple(m["noise_shape"]), m["seed"], None,
                    m["per_chunk_noise"], prefix, m["limit"], start_step=m["next_step"], window=window,
                    frames_done=m["frames_done"], chunks_done=m["chunks_done"], tail=_state_tail(state))  # fmt: skip

    def _decode(self, latent: torch.Tensor) -> torch.Tensor:
        rt = self.config.runtime
        kwargs = dict(fps=rt.fps, scale_factor=rt.scale_factor, compat=self.compat)
        if self.mesh is not None:
            from magi.distributed.vae_parallel import decode_to_uint8
        else:
            decode_to_uint8 = video_io.decode_to_uint8
        with self._vae_on_device():
            return decode_to_uint8(self.vae, latent, **kwargs)

    def _latent_channels(self) -> int:
        cfg = self.config.model
        return cfg.in_channels // 2 if cfg.half_channel_vae else cfg.in_channels

    def _initial_noise(self, run: Run) -> InitialNoise:
        """The only random draw: randn(shape) from a generator seeded with ``seed`` on the device.

        Held in host memory, or above ``noise_spill_bytes`` in a temporary file, and read chunk
        by chunk as chunks enter the window (``magi.sampling.noise``); same values either way.
        """
        cw = self.config.runtime.chunk_width
        if run.noise is not None:
            return InitialNoise.from_tensor(run.noise, cw)
        if run.per_chunk_noise:
            return InitialNoise.per_chunk(run.noise_shape, run.seed, cw)
        return InitialNoise.draw(run.noise_shape, run.seed, cw, device=self.device,
                                 spill_bytes=self.noise_spill_bytes)  # fmt: skip

    def _vae_on_device(self):
        """Context in which ``self.vae`` has its weights on the device (see ``vae_offload``)."""
        return nullcontext() if self._vae_host is None else self._vae_host.on_device()

    def _prefix_latent(self, mode: str, image_path: str | Path | None,
                       prefix_video_path: str | Path | None) -> torch.Tensor | None:
        """i2v: the encoded image (P = 1); v2v: the encoded prefix clip; t2v: None."""
        rt = self.config.runtime
        size = (rt.video_size_w, rt.video_size_h)
        if mode == "i2v":
            frames = video_io.load_image(image_path, size, compat=self.compat)
        elif mode == "v2v":
            visible = video_io.visible_prefix_frames(rt.noise2clean_kvrange or (8,), rt.chunk_width,
                                                     rt.temporal_downsample_factor)  # fmt: skip
            frames = video_io.load_prefix_video(prefix_video_path, rt.fps, size, visible,
                                                compat=self.compat)  # fmt: skip
        else:
            return None
        with self._vae_on_device():
            return video_io.encode_prefix(self.vae, frames, fps=rt.fps, scale_factor=rt.scale_factor,
                                          compat=self.compat).to(self.device)  # fmt: skip

    def _captions(self, prompts: list[str], plan: ChunkPlan) -> ChunkCaptions:
        n_gen = len(plan.generated_chunks)
        used = [prompts[min(i, len(prompts) - 1)] for i in range(n_gen)]  # only chunks generated
        distinct = list(dict.fromkeys(used))
        emb, mask = self._encode(distinct)
        position = {p: k for k, p in enumerate(distinct)}
        chunk_prompts = [position[p] for p in used]
        null = self.dit.y_embedder.null_caption_embedding.detach()
        options = SpecialTokenOptions.from_env()
        return ChunkCaptions(emb.to(self.device), mask.to(self.device), null.to(self.device),
                             self._tokens(options, emb.shape[-1]).to(self.device), options,
                             chunk_prompts, plan.offset, distinct)  # fmt: skip

    def _tokens(self, options: SpecialTokenOptions, width: int) -> SpecialTokens:
        if not token_users(options):
            return zero_tokens(width)
        if self._special_tokens is None:
            self._special_tokens = load_special_tokens(find_special_tokens(self.config))
        return self._special_tokens

    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """T5 features of prompts ([n, Lcap, Ccap], [n, Lcap]); T5 is loaded only for new ones."""
        # This request's encodings are held here for the request; the cache (PROMPT_CACHE_SIZE,
        # least recently used dropped first) only saves T5 runs across requests.
        held = {p: self._prompt_cache[p] for p in prompts if p in self._prompt_cache}
        for p in held:
            self._prompt_cache[p] = self._prompt_cache.pop(p)  # most recently used last
        missing = [p for p in prompts if p not in held]
        if missing:
            from magi.models.text_encoder import T5Encoder

            rt = self.config.runtime
            if not rt.t5_pretrained:
                raise ValueError("runtime_config.t5_pretrained is not set: point it at the T5 folder")
            t5_device = rt.t5_device if rt.t5_device == "cpu" or torch.cuda.is_available() else "cpu"
            def run_t5() -> tuple[torch.Tensor, torch.Tensor]:
                with T5Encoder.from_pretrained(rt.t5_pretrained, device=t5_device) as t5:
                    return t5.encode(missing)

            if self.mesh is None:
                emb, mask = run_t5()
            else:  # T5 runs on rank 0 only; the other ranks receive its result
                from magi.distributed import share_from_rank0

                emb, mask = share_from_rank0(run_t5, self.mesh)
            for p, e, m in zip(missing, emb, mask):
                held[p] = self.remember_prompt(p, e, m)
        pairs = [held[p] for p in prompts]
        return torch.stack([e for e, _ in pairs]), torch.stack([m for _, m in pairs])

    def remember_prompt(self, prompt: str, emb: torch.Tensor,
                        mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Use these T5 features for ``prompt`` from now on (skips T5 for it).

        Args:
            prompt: the raw prompt text.
            emb: [Lcap, Ccap] float32 T5 output (as ``T5Encoder.encode`` gives per prompt).
            mask: [Lcap] 1 for real tokens.

        Returns:
            The (emb [Lcap, Ccap], mask [Lcap]) pair as stored.
        """
        emb = emb.reshape(emb.shape[-2:]).float().cpu()  # [Lcap, Ccap]
        pair = (emb, mask.reshape(-1).float().cpu())
        self._prompt_cache.pop(prompt, None)
        self._prompt_cache[prompt] = pair
        while len(self._prompt_cache) > PROMPT_CACHE_SIZE:
            self._prompt_cache.pop(next(iter(self._prompt_cache)))
        return pair


@dataclass(frozen=True)
class _Sinks:
    """Where a generate / resume / extend call sends its chunks (see ``magi.sinks.Outputs``)."""

    output_path: str | Path | None
    segments: str | Path | None = None
    keep_segments: int = 0  # segments already in the folder that belong to this run (resume)
    on_chunk: Callable[[VideoChunk], None] | None = None


def _check_mode(mode: str, image_path: str | Path | None, prefix_video_path: str | Path | None) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "i2v" and image_path is None:
        raise ValueError("mode i2v needs image_path (the image the video starts from)")
    if mode == "v2v" and prefix_video_path is None:
        raise ValueError("mode v2v needs prefix_video_path (the video to continue)")
    if mode != "i2v" and image_path is not None:
        raise ValueError(f"image_path is only used with mode i2v (got mode {mode})")
    if mode != "v2v" and prefix_video_path is not None:
        raise ValueError(f"prefix_video_path is only used with mode v2v (got mode {mode})")


def _is_distributed(cfg: MagiConfig) -> bool:
    return cfg.engine.pp_size * cfg.engine.cp_size > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1


def _build_dit(cfg: MagiConfig, device: torch.device,
               offload_blocks: bool) -> tuple[nn.Module, object | None, torch.device]:  # fmt: skip
    """(DiT, mesh or None, compute device): parallel under torchrun, else whole or streamed."""
    from magi.checkpoint import load_dit

    if _is_distributed(cfg):
        from magi.distributed import init_from_env
        from magi.distributed.parallelize import build_parallel_dit

        mesh = init_from_env(cfg.engine, device)  # "cuda" -> this rank's GPU; "cpu" stays cpu
        return build_parallel_dit(cfg, mesh), mesh, mesh.device
    if offload_blocks:
        from magi.offload import offload_blocks as stream_blocks

        dit = load_dit(cfg, torch.device("cpu"))  # the layer stack never sits on the device
        stream_blocks(dit, device)
        return dit, None, device
    return load_dit(cfg, device), None, device


def _check_options(cfg: MagiConfig, device: torch.device, attention_backend: str,
                   offload_blocks: bool, compile: bool | dict) -> None:  # fmt: skip
    """Fail on a bad option before any model loads; set the attention backend."""
    from magi import attention

    attention.check_backend(attention_backend, device, cfg.model.dtype)
    if offload_blocks and _is_distributed(cfg):
        raise ValueError("offload_blocks works in a single process only; drop it for pp_size * "
                         "cp_size > 1 (each rank already holds only its share of the layers)")  # fmt: skip
    if not isinstance(compile, (bool, dict)):
        raise ValueError(f"compile must be True, False or a dict of torch.compile keywords, got {compile!r}")
    attention.set_backend(attention_backend)


def _state_tail(state: GenerationState) -> list[tuple[int, torch.Tensor]]:
    """The (chunk, clean latent) pairs a state keeps for extend, oldest first."""
    tail = [(int(k.split(".", 1)[1]), v) for k, v in state.extra.items() if k.startswith("clean.")]
    return sorted(tail, key=lambda pair: pair[0])


def open_state(state: str | Path | GenerationState, identity: dict, *,
               finished: bool) -> tuple[GenerationState, object]:  # fmt: skip
    """Load (when a path) and check a state for resume (``finished=False``) or extend (True).

    Returns:
        (the state, how errors name it).

    Raises:
        StateError: damaged, from another setup, or finished / unfinished against ``finished``.
    """
    loaded = state if isinstance(state, GenerationState) else GenerationState.load(state)
    where = "the state" if isinstance(state, GenerationState) else state
    loaded.check_compatible(identity, where)
    if finished and not loaded.meta.get("finished"):
        raise StateError(f"{where} is not a finished run; resume it first, then extend it")
    if not finished and loaded.meta.get("finished"):
        raise StateError(f"{where} is a finished run: nothing left to resume")
    return loaded, where


def state_identity(cfg: MagiConfig, compat: str) -> dict:
    """What a saved state must share with a run of ``cfg`` to be resumed by it (no model loaded)."""
    import magi
    from magi.state import checkpoint_hash, config_hash

    return {"magi_version": magi.__version__, "compat": compat, "config_hash": config_hash(cfg),
            "checkpoint_hash": checkpoint_hash(cfg.runtime.load)}  # fmt: skip


