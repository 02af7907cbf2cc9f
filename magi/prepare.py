"""A request -> a ``Run``: the checked request, its prefix latents, chunk plan and caption rows;
or a saved state -> the ``Run`` that continues it; and back, a ``Run`` -> a state (``snapshot``).

The rules a request must follow are ``magi.request``'s; the frame budget is ``magi.budget``'s.
Nothing here denoises: the run loop (``magi.generation``) takes the ``Run``.

Legend: C latent channels, T latent frames, H W latent size, P prefix latent frames.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from magi import budget
from magi.captions import ChunkCaptions
from magi.conditioning import SpecialTokenOptions
from magi.engine import Engine
from magi.prompts import PromptEncoder
from magi.request import check_frames, check_mode, check_prompts_fit, check_seed, prompt_list
from magi.sampling.chunks import ChunkPlan
from magi.sampling.denoise import SamplerSettings
from magi.state import GenerationState, StateError, state_tail

# Clean chunks a state keeps for extend: what a new chunk can still see (max(kv range) - 1 with
# the shipped (5, 4, 3, 2)); the first generated chunks of an extension attend to them.
TAIL_CHUNKS = 4


@dataclass
class Run:
    """One prepared request."""

    mode: str
    plan: ChunkPlan
    settings: SamplerSettings
    captions: ChunkCaptions
    noise_shape: tuple[int, ...]  # [1, C, T, H, W] of the whole video
    seed: int
    noise: torch.Tensor | None  # given noise, or None to draw it from seed
    per_chunk_noise: bool  # chunk k drawn alone from seed + k (not the official noise)
    prefix: torch.Tensor | None
    limit: int | None  # frames to keep (magi), None = every frame (official)
    start_step: int = 0  # > 0: resumed from a GenerationState with this window
    window: dict[int, torch.Tensor] | None = None
    frames_done: int = 0  # frames / chunks already emitted (counting those of a resumed state)
    chunks_done: int = 0
    tail: list[tuple[int, torch.Tensor]] = dataclasses.field(default_factory=list)  # last clean chunks
    earlier_frames: int = 0  # frames of the earlier video the output continues (an extension appended to it)


@dataclass(frozen=True)
class Request:
    """One generation request as the library takes it (checked by ``prepare``)."""

    mode: str
    prompt: str | Sequence[str]
    image_path: str | Path | None = None
    prefix_video_path: str | Path | None = None
    seed: int | None = None
    num_frames: int | None = None
    noise: torch.Tensor | None = None
    per_chunk_noise: bool = False
    prefix_latent: torch.Tensor | None = None  # v2v from clean latents [1, C, P, H, W] (extend)


def check_request(request: Request) -> None:
    """The request's own rules (no model): mode and inputs, noise options."""
    if request.prefix_latent is not None and (request.mode != "v2v" or request.prefix_video_path is not None):
        raise ValueError("prefix_latent is the v2v prefix: use it with mode v2v and no prefix_video_path")
    if request.prefix_latent is None:
        check_mode(request.mode, request.image_path, request.prefix_video_path)
    if request.noise is not None and request.per_chunk_noise:
        raise ValueError("give either noise or per_chunk_noise=True, not both")


def prepare(engine: Engine, prompts: PromptEncoder, request: Request) -> Run:
    """Check the request, encode the prefix and the prompts, plan the chunks (noise: the run loop)."""
    cfg, compat = engine.config, engine.compat
    rt = cfg.runtime
    check_request(request)
    texts = prompt_list(request.prompt)
    frames = rt.num_frames if request.num_frames is None else check_frames(request.num_frames)
    seed = rt.seed if request.seed is None else check_seed(request.seed)
    mode = request.mode
    # noise file, one chunk's latent / frames: refused now if they cannot fit (magi.budget)
    est = budget.check_request(
        cfg,
        mode,
        frames,
        budget.prefix_frames_upper_bound(cfg, mode, compat),
        compat=compat,
        noise_spill_bytes=engine.noise_spill_bytes,
        draw_noise=request.noise is None and not request.per_chunk_noise,
    )
    check_prompts_fit(len(texts), est.generated_chunks, frames, "prompt")
    if request.prefix_latent is not None:
        prefix = request.prefix_latent.to(engine.device)
    else:
        prefix = engine.encode_prefix(mode, request.image_path, request.prefix_video_path)
    p = 0 if prefix is None else prefix.shape[2]
    tile = budget.tile_frames(rt.fps, compat) // rt.temporal_downsample_factor
    chunks = budget.chunk_count(
        mode, frames, p, rt.chunk_width, compat=compat, temporal_factor=rt.temporal_downsample_factor, tile_latents=tile
    )
    settings = SamplerSettings.from_config(cfg)
    plan = settings.plan(chunks, p)
    shape = (1, engine.latent_channels, chunks * rt.chunk_width, rt.video_size_h // 8, rt.video_size_w // 8)
    if request.noise is not None and tuple(request.noise.shape) != shape:
        raise ValueError(f"noise must have shape {shape} for this request, got {tuple(request.noise.shape)}")
    captions = prompts.captions(texts, len(plan.generated_chunks), plan.offset, engine.null_caption, engine.device)
    limit = None if compat == "official" else frames
    return Run(mode, plan, settings, captions, shape, seed, request.noise, request.per_chunk_noise, prefix, limit)


def from_state(engine: Engine, prompts: PromptEncoder, state: GenerationState) -> Run:
    """The prepared run that continues ``state`` (no T5, no VAE encode)."""
    m, device = state.meta, engine.device
    settings = SamplerSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in m["settings"].items()})
    plan = settings.plan(m["chunk_num"], m["prefix_frames"])
    options = SpecialTokenOptions(**m["special_tokens"])
    captions = prompts.captions_from_state(
        state.prompt_emb,
        state.prompt_mask,
        m["prompts"],
        m["chunk_prompts"],
        options,
        plan.offset,
        engine.null_caption,
        device,
    )
    prefix = None if state.prefix is None else state.prefix.to(device)
    window = {c: t.to(device) for c, t in state.window.items()}
    return Run(
        m["mode"],
        plan,
        settings,
        captions,
        tuple(m["noise_shape"]),
        m["seed"],
        None,
        m["per_chunk_noise"],
        prefix,
        m["limit"],
        start_step=m["next_step"],
        window=window,
        frames_done=m["frames_done"],
        chunks_done=m["chunks_done"],
        tail=state_tail(state),
        earlier_frames=m.get("earlier_frames", 0),
    )


def extension_prefix(state: GenerationState, where: object) -> torch.Tensor:
    """The clean latents [1, C, P, H, W] (float32) a finished state is continued from."""
    tail = state_tail(state)
    if not tail:
        raise StateError(f"{where} keeps no clean latents to continue from")
    return torch.cat([t for _, t in tail], dim=2)


def snapshot(run: Run, next_step: int, window: dict[int, torch.Tensor], identity: dict) -> GenerationState:
    """The state after step next_step - 1 (copies of the live window's latents, on CPU)."""
    caps = run.captions
    meta = {
        "next_step": next_step,
        "finished": next_step >= run.plan.total_steps,
        "mode": run.mode,
        "seed": run.seed,
        "per_chunk_noise": run.per_chunk_noise,
        "noise_shape": list(run.noise_shape),
        "limit": run.limit,
        "chunk_num": run.plan.chunk_num,
        "prefix_frames": run.plan.prefix_frames,
        "frames_done": run.frames_done,
        "chunks_done": run.chunks_done,
        "earlier_frames": run.earlier_frames,
        "prompts": caps.texts,
        "chunk_prompts": caps.chunk_prompts,
        "special_tokens": dataclasses.asdict(caps.options),
        "settings": dataclasses.asdict(run.settings),
        "identity": identity,
    }
    window = {c: t.detach().float().cpu().clone() for c, t in window.items()}
    prefix = None if run.prefix is None else run.prefix.detach().cpu()
    tail = {f"clean.{c}": t for c, t in run.tail}  # what extend continues from
    return GenerationState(meta, window, prefix, caps.emb.cpu(), caps.mask.cpu(), tail)
