"""MagiPipeline: prompt (+ image / video) -> prefix latents -> chunked denoising -> streamed mp4.

A thin facade: ``from_config`` loads the models once (``magi.engine``); each call builds a
request, prepares it into a ``Run`` (``magi.prepare``), runs it in the loop (``magi.generation``)
and sends the chunks to the sinks (``magi.sinks``). The DiT and the VAE stay resident; T5 is
loaded on ``runtime_config.t5_device`` only to encode new prompts and freed right after (encoded
prompts are remembered, a few at a time: ``magi.prompts``). Each chunk is decoded and written as
soon as the sampler finishes it, so memory does not grow with the video length.

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
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from magi.budget import SPILL_BYTES, chunk_count, decoded_frames
from magi.captions import ChunkCaptions
from magi.config import MagiConfig, check_paths, load_config
from magi.engine import Engine, check_files, resolve_device
from magi.generation import STOP_SIGNALS, Control, Generation, NonFiniteLatentError, execute
from magi.hub import DEFAULT_VARIANT, resolve_pretrained
from magi.models.vae import ViTVAE
from magi.output import OUTPUT_TYPES, check_output_type, export_to_video
from magi.prepare import TAIL_CHUNKS, Request, Run, check_request, extension_prefix, from_state, prepare, resume_length
from magi.prompts import PROMPT_CACHE_SIZE, PromptEncoder, check_special_tokens, find_special_tokens
from magi.request import COMPAT_MODES, MODES, check_compat
from magi.results import GenerationResult, StepInfo, VideoChunk
from magi.sinks import Destinations, StateSaver, VideoWriteError, check_earlier_video, open_outputs
from magi.state import GenerationState, open_state, state_identity, video_frames

__all__ = [  # the public names; the steering / result / sink types live in magi.generation / results / sinks
    "MagiPipeline", "Control", "Generation", "GenerationResult", "StepInfo", "VideoChunk", "ChunkCaptions",
    "VideoWriteError", "NonFiniteLatentError", "StateSaver", "STOP_SIGNALS", "MODES", "COMPAT_MODES",
    "PROMPT_CACHE_SIZE", "TAIL_CHUNKS", "check_files", "check_special_tokens", "chunk_count", "decoded_frames",
    "find_special_tokens", "open_state", "resolve_device", "state_identity", "check_earlier_video",
    "OUTPUT_TYPES", "export_to_video",
]  # fmt: skip

StepCallback = Callable[[StepInfo], None]
ChunkCallback = Callable[[VideoChunk], None]


class MagiPipeline:
    """MAGI-1 text/image/video-to-video generation, streamed chunk by chunk.

    Build with :meth:`from_config`; call :meth:`generate` (writes an mp4) or :meth:`stream`
    (yields each chunk's frames as soon as it is clean); :meth:`resume` and :meth:`extend`
    continue a saved generation state.

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

    def __init__(self, config: MagiConfig, dit: nn.Module, vae: ViTVAE, *, device: torch.device | str = "cpu",
                 compat: str = "magi", mesh: object | None = None, vae_offload: bool = False,
                 noise_spill_bytes: int = SPILL_BYTES) -> None:  # fmt: skip
        check_compat(compat)
        self.engine = Engine.assemble(config, dit, vae, device, compat, mesh, vae_offload, noise_spill_bytes)
        self.prompts = PromptEncoder(config, mesh)

    # The engine's fields, read (and, for tests and tools, replaced) through the pipeline.
    config = property(lambda self: self.engine.config, lambda self, v: self._set_config(v))
    dit = property(lambda self: self.engine.dit)
    vae = property(lambda self: self.engine.vae)
    device = property(lambda self: self.engine.device)
    compat = property(lambda self: self.engine.compat)
    mesh = property(lambda self: self.engine.mesh)
    noise_spill_bytes = property(lambda self: self.engine.noise_spill_bytes)
    vae_host = property(lambda self: self.engine.vae_host, doc="the host-resident VAE (None: on the device)")

    def _set_config(self, config: MagiConfig) -> None:
        self.engine.config = self.prompts.config = config

    @classmethod
    def from_config(cls, config: str | Path | MagiConfig, device: torch.device | str | None = None,
                    compat: str = "magi", *, attention_backend: str = "auto", offload_blocks: bool = False,
                    compile: bool | dict = False, vae_offload: bool | None = None,
                    noise_spill_bytes: int = SPILL_BYTES, memory_check: bool = True) -> MagiPipeline:  # fmt: skip
        """Load the DiT and the VAE named by a config (T5 is loaded per new prompt, then freed).

        Memory and speed options (docs/PERFORMANCE.md §5); none changes the result.

        Args:
            config: an official-format JSON file or a loaded ``MagiConfig``. Missing DiT, T5 or
                VAE checkpoints are reported together (``CheckpointNotFoundError``) before
                anything loads. special_tokens.npz: see ``magi.prompts.find_special_tokens``.
            device: "cuda", "cuda:N" or "cpu" (default: CUDA when available). Under torchrun
                with pp_size * cp_size > 1 each rank uses its own GPU.
            compat: "magi" (default) or "official".
            attention_backend: "auto", "sdpa", "flex" or "flash" (checked before loading).
            offload_blocks: keep the DiT in host memory and stream its layers to the device one
                at a time (single process only).
            compile: ``torch.compile`` each transformer layer; a dict is passed as keywords.
            vae_offload: keep the VAE in host memory except while it encodes / decodes
                (default: on with ``offload_blocks``).
            noise_spill_bytes: initial noise above this size lives in a temporary file.
            memory_check: on CUDA, refuse before loading a run that cannot fit the GPU (the
                estimate of ``python -m magi.plan``); False skips it.
        """
        cfg = config if isinstance(config, MagiConfig) else load_config(config)
        check_compat(compat)
        check_paths(cfg)  # every missing checkpoint at once, before minutes of loading
        engine = Engine.load(cfg, resolve_device(device), compat, attention_backend=attention_backend,
                             offload_blocks=offload_blocks, compile=compile, vae_offload=vae_offload,
                             noise_spill_bytes=noise_spill_bytes, memory_check=memory_check)  # fmt: skip
        return cls._over(engine, PromptEncoder(cfg, engine.mesh))

    @classmethod
    def from_pretrained(cls, repo_or_dir: str | Path, variant: str = DEFAULT_VARIANT, *,
                        cache_dir: str | Path | None = None, **kwargs: object) -> MagiPipeline:  # fmt: skip
        """Load an official checkpoint by folder or Hub repo id, e.g. ``from_pretrained("sand-ai/MAGI-1")``.

        Args:
            repo_or_dir: a folder laid out as ``python -m magi.download`` writes it (its
                ``<variant>_config.json``, or the ``ckpt/`` weights), a config .json, or a Hub repo
                id, downloaded once into the user cache (``magi.hub.resolve_pretrained``).
            variant: 4.5B_distill (default), 4.5B_base, 4.5B_distill_quant, 24B_base, ...
            cache_dir: where a Hub download goes (default ~/.cache/magi/<owner>--<name>).
            kwargs: as for :meth:`from_config` (device, compat, attention_backend, ...).
        """
        return cls.from_config(resolve_pretrained(repo_or_dir, variant, cache_dir), **kwargs)

    def __call__(self, prompt: str | Sequence[str], num_frames: int | None = None, *,
                 image: str | Path | None = None, video: str | Path | None = None, output_type: str | None = "np",
                 output_path: str | Path | None = None, progress: bool | None = None,
                 **kwargs: object) -> GenerationResult:  # fmt: skip
        """Generate and return the frames, diffusers-style: ``pipe("a cat", num_frames=48).frames``.

        t2v, or i2v from ``image`` (a file), or v2v continuing ``video`` (a file). The result's
        ``frames`` are in the form ``output_type`` names ("np" uint8 (T, H, W, 3) by default,
        "pil", "pt", "latent"); an mp4 is written only when ``output_path`` is given
        (``magi.output.export_to_video`` writes the frames later). Other keywords (seed,
        callback, noise, control, ...) are :meth:`generate`'s.
        """
        if image is not None and video is not None:
            raise ValueError("pass image (i2v) or video (v2v), not both")
        mode = "i2v" if image is not None else "v2v" if video is not None else "t2v"
        return self.generate(mode, prompt, image, video, output_path, num_frames=num_frames,
                             output_type=check_output_type(output_type), progress=progress, **kwargs)  # fmt: skip

    @classmethod
    def _over(cls, engine: Engine, prompts: PromptEncoder) -> MagiPipeline:
        pipe = cls.__new__(cls)
        pipe.engine, pipe.prompts = engine, prompts
        return pipe

    def resized(self, width: int, height: int) -> MagiPipeline:
        """A pipeline at another video size sharing this one's models and prompt encodings."""
        rt = self.config.runtime
        cfg = self.config.replace(runtime=dataclasses.replace(rt, video_size_w=width, video_size_h=height))
        return self._over(dataclasses.replace(self.engine, config=cfg), self.prompts)

    def identity(self) -> dict:
        """What a saved state must share with this pipeline to be resumed here."""
        return state_identity(self.config, self.compat)

    def remember_prompt(self, prompt: str, emb: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Use these T5 features ([Lcap, Ccap], mask [Lcap]) for ``prompt`` from now on (skips T5)."""
        return self.prompts.remember(prompt, emb, mask)

    # ---- requests ----------------------------------------------------------------------------
    def stream(self, mode: str, prompt: str | Sequence[str], image_path: str | Path | None = None,
               prefix_video_path: str | Path | None = None, *, seed: int | None = None,
               num_frames: int | None = None, callback: StepCallback | None = None,
               noise: torch.Tensor | None = None, per_chunk_noise: bool = False,
               control: Control | None = None) -> Generation:  # fmt: skip
        """Generate a video and yield each chunk's frames as soon as the chunk is clean.

        The request is checked and prepared (prompts and prefix encoded) here; the chunks are
        denoised as the returned handle is iterated. ``handle.set_prompt(from_chunk, text)``
        steers the chunks not yet in the window, ``handle.stop()`` ends it after the current
        step (the rule: ``magi.generation.Control``).

        Args:
            mode: "t2v", "i2v" (needs image_path) or "v2v" (needs prefix_video_path).
            prompt: one prompt for the whole video, or a list: prompt i for generated chunk i,
                the last one repeating (more prompts than generated chunks is an error).
            image_path: i2v start image. prefix_video_path: v2v video to continue.
            seed: seed of the initial noise (default runtime_config.seed).
            num_frames: frames to generate (default runtime_config.num_frames).
            callback: called with a ``StepInfo`` after every sampler step.
            noise: the initial noise [1, C, T, H, W] instead of drawing it from ``seed``.
            per_chunk_noise: draw chunk k's noise alone from seed + k (bounded memory, but NOT
                the official noise: the same seed gives a different video).
            control: a ``Control`` to steer / stop it with (default: a new one, ``handle.control``).

        Returns:
            A ``Generation``: iterating it yields a ``VideoChunk`` per generated chunk, in order.
        """
        request = Request(mode, prompt, image_path, prefix_video_path, seed, num_frames, noise, per_chunk_noise)
        run = prepare(self.engine, self.prompts, request)
        return Generation(self.engine, self.prompts, run, callback, control)

    def generate(self, mode: str, prompt: str | Sequence[str], image_path: str | Path | None = None,
                 prefix_video_path: str | Path | None = None, output_path: str | Path | None = None,
                 seed: int | None = None, num_frames: int | None = None, callback: StepCallback | None = None,
                 save_tensors: str | Path | None = None, noise: torch.Tensor | None = None,
                 progress: bool | None = None, per_chunk_noise: bool = False, save_state: str | Path | None = None,
                 save_every: int = 1, prefix_latent: torch.Tensor | None = None,
                 segments: str | Path | None = None, control: Control | None = None,
                 on_chunk: ChunkCallback | None = None, output_type: str | None = None) -> GenerationResult:  # fmt: skip
        """Generate a video; write it to ``output_path`` chunk by chunk (mp4, runtime fps).

        The mp4 goes to a temporary file next to ``output_path``, renamed on success; a failed
        run leaves nothing there. A stop (``control.stop()``, Ctrl-C) keeps a playable mp4 of
        the chunks done so far and sets ``GenerationResult.interrupted``.

        Args:
            mode, prompt, image_path, prefix_video_path, seed, num_frames, callback, noise,
                per_chunk_noise, control: as for :meth:`stream`.
            output_path: the .mp4 to write (None: generate without writing a video).
            save_tensors: also save ``final_latent`` (float32 [1, C, T, H/8, W/8], the clean
                latents of the generated chunks) and ``video_tchw_uint8`` (the written frames)
                to this .safetensors file (written chunk by chunk through spill files beside it).
            progress: a per-chunk progress bar (rank 0 only); None (default): shown when stderr
                is a terminal or in a notebook.
            save_state: write the generation state (``magi.state``) to this file every
                ``save_every`` finished chunks and when the run is stopped; continue it with
                :meth:`resume`.
            prefix_latent: v2v from clean latents [1, C, P, H, W] (VAE latents x scale factor)
                instead of ``prefix_video_path``.
            segments: also write every chunk as its own mp4 into this folder (``SegmentSink``);
                ``output_path`` is then joined from them at the end or when stopped, so with
                ``save_state`` a run killed with ``kill -9`` keeps its video.
            on_chunk: called with each ``VideoChunk`` once it is written.
            output_type: also return the frames as ``GenerationResult.frames``: "np", "pil", "pt"
                or "latent" (``magi.output``; kept in memory until the end). None: no frames.
        """
        request = Request(mode, prompt, image_path, prefix_video_path, seed, num_frames, noise, per_chunk_noise,
                          prefix_latent)  # fmt: skip
        check_request(request)
        saver = None if save_state is None else StateSaver(save_state, save_every, noise is None)
        dest = Destinations(
            output_path, segments, 0, on_chunk, save_tensors, output_type=check_output_type(output_type)
        )
        return self._execute(lambda: prepare(self.engine, self.prompts, request), dest, callback, progress,
                             saver, control, prefix_video_path)  # fmt: skip

    def resume(self, state: str | Path | GenerationState, output_path: str | Path | None = None, *,
               callback: StepCallback | None = None, progress: bool | None = None, save_state: str | Path | None = None,
               save_every: int = 1, save_tensors: str | Path | None = None, segments: str | Path | None = None,
               control: Control | None = None, on_chunk: ChunkCallback | None = None,
               output_type: str | None = None, num_frames: int | None = None) -> GenerationResult:  # fmt: skip
        """Continue a run from a saved state, bit for bit as if it had never stopped.

        Args:
            state: a state file written by ``generate(save_state=...)`` (or a loaded state).
            output_path: where the remaining chunks go. If it holds the earlier run's video
                (exactly the state's frames), the new chunks are appended to it (stream copy);
                a missing file gets the remaining chunks only.
            save_state: keep saving states (default: the file resumed from, when given as a path).
            segments: the segment folder the interrupted run wrote: its segments of the chunks
                the state covers are kept, the new chunks join them, and ``output_path`` is
                joined from them all (one playable mp4 even after ``kill -9``).
            save_tensors: as for :meth:`generate`; a file the interrupted run wrote there (exactly
                the state's chunks) is continued, so it holds the whole video; otherwise it holds
                only this call's chunks (one warning says so).
            callback, progress, save_every, control, on_chunk, output_type: as for
                :meth:`generate` (the frames of this call only).
            num_frames: another length for the whole video (None: the state's). The chunks
                finished and in flight stay as they are; added chunks take noise of their own
                (``magi.prepare.resume_length`` / ``resumed_noise``; docs/CLI.md says what the
                frames then equal).

        Raises:
            StateError: a damaged or edited state, one from another magi version, config,
                checkpoint or compat mode, or a finished one; an output that does not hold the
                state's frames (resumed twice into the same output).
            RequestError: a ``num_frames`` below the frames written, or one whose chunk plan
                differs before the resume point (the run had begun ending its video).
        """
        loaded, where = open_state(state, self.identity(), finished=False)
        resume_length(loaded, self.config.runtime, num_frames)  # refused before any output opens
        earlier = None
        if segments is None:
            earlier = check_earlier_video(output_path, video_frames(loaded), where)
        target = save_state if save_state is not None else (None if isinstance(state, GenerationState) else state)
        saver = None if target is None else StateSaver(target, save_every, True)
        dest = Destinations(output_path, segments, loaded.meta["chunks_done"], on_chunk, save_tensors, earlier,
                            check_output_type(output_type))  # fmt: skip
        return self._execute(lambda: from_state(self.engine, self.prompts, loaded, num_frames), dest, callback,
                             progress, saver, control)  # fmt: skip

    def extend(self, state: str | Path | GenerationState, prompt: str | Sequence[str], num_frames: int,
               output_path: str | Path | None = None, *, seed: int | None = None,
               callback: StepCallback | None = None, progress: bool | None = None, save_state: str | Path | None = None,
               save_every: int = 1, save_tensors: str | Path | None = None, segments: str | Path | None = None,
               control: Control | None = None, on_chunk: ChunkCallback | None = None,
               output_type: str | None = None) -> GenerationResult:  # fmt: skip
        """Continue a finished video by ``num_frames`` frames with new prompts.

        MAGI's own v2v conditioning, fed with the finished run's exact clean latents (its last
        ``TAIL_CHUNKS`` chunks, kept in the state) instead of re-encoded pixels: the same as
        ``generate("v2v", prompt, prefix_latent=those latents, ...)``.

        Args:
            state: the state a finished ``generate(save_state=...)`` / ``resume`` wrote.
            output_path: the new frames' mp4; when it holds the finished video (exactly its
                frames), the continuation is appended to it (stream copy).
            prompt, num_frames, seed, callback, progress, save_state, save_every, save_tensors,
                segments, control, on_chunk, output_type: as for :meth:`generate` (segments: the new chunks).

        Raises:
            StateError: a damaged state, another model / compat mode, or an unfinished run.
        """
        loaded, where = open_state(state, self.identity(), finished=True)
        request = Request(
            "v2v", prompt, seed=seed, num_frames=num_frames, prefix_latent=extension_prefix(loaded, where)
        )
        earlier = None
        if output_path is not None and Path(output_path).is_file():
            earlier = check_earlier_video(output_path, video_frames(loaded), where)
        saver = None if save_state is None else StateSaver(save_state, save_every, True)
        dest = Destinations(output_path, segments, 0, on_chunk, save_tensors, earlier, check_output_type(output_type))
        before = 0 if earlier is None else video_frames(loaded)  # its state then counts the video it extends

        def make_run() -> Run:
            run = prepare(self.engine, self.prompts, request)
            run.earlier_frames = before
            return run

        return self._execute(make_run, dest, callback, progress, saver, control)

    def _execute(self, make_run: Callable, dest: Destinations, callback: StepCallback | None, progress: bool | None,
                 saver: StateSaver | None, control: Control | None,
                 prefix_video_path: str | Path | None = None) -> GenerationResult:  # fmt: skip
        rt = self.config.runtime
        out = open_outputs(dest, rt.fps, (rt.video_size_w, rt.video_size_h), self.engine.is_writer, prefix_video_path)
        return execute(self.engine, self.prompts, make_run, out, callback=callback, progress=progress, saver=saver,
                       control=control)  # fmt: skip
