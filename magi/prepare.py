"""A request -> a ``Run``: the checked request, its prefix latents, chunk plan and caption rows;
or a saved state -> the ``Run`` that continues it (``from_state``, made longer or shorter by
``resume_length``'s rule); and back, a ``Run`` -> a state (``snapshot``).

The rules a request must follow are ``magi.request``'s; the frame budget is ``magi.budget``'s.
Nothing here denoises: the run loop (``magi.generation``) takes the ``Run``.

Legend: C latent channels, T latent frames, H W latent size, P prefix latent frames.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch

from magi import budget
from magi.captions import ChunkCaptions
from magi.conditioning import SpecialTokenOptions
from magi.engine import Engine
from magi.prompts import PromptEncoder
from magi.request import RequestError, check_frames, check_mode, check_prompts_fit, check_seed, prompt_list
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
    # chunks added on resume beyond noise_shape: (first chunk, chunks), each its own draw (added_noise_seed)
    noise_parts: tuple[tuple[int, int], ...] = ()


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


def from_state(engine: Engine, prompts: PromptEncoder, state: GenerationState, num_frames: int | None = None) -> Run:
    """The prepared run that continues ``state`` (no T5, no VAE encode); ``num_frames``: another
    length for the video, by ``resume_length``'s rule (None: the state's own)."""
    m, device = state.meta, engine.device
    settings = saved_settings(m)
    chunk_num, limit = resume_length(state, engine.config.runtime, num_frames)
    if chunk_num > m["chunk_num"]:  # the longer video's noise must fit, as for a new request
        budget.check_request(
            engine.config,
            m["mode"],
            num_frames,
            m["prefix_frames"],
            compat=engine.compat,
            noise_spill_bytes=engine.noise_spill_bytes,
            draw_noise=not m["per_chunk_noise"],
        )
    plan = settings.plan(chunk_num, m["prefix_frames"])
    generated = len(plan.generated_chunks)  # a longer video: its added chunks keep the last prompt
    chunk_prompts = (list(m["chunk_prompts"]) + [m["chunk_prompts"][-1]] * generated)[:generated]
    options = SpecialTokenOptions(**m["special_tokens"])
    captions = prompts.captions_from_state(
        state.prompt_emb,
        state.prompt_mask,
        m["prompts"],
        chunk_prompts,
        options,
        plan.offset,
        engine.null_caption,
        device,
    )
    prefix = None if state.prefix is None else state.prefix.to(device)
    window = {c: t.to(device) for c, t in state.window.items()}
    noise_shape, noise_parts = resumed_noise(m, chunk_num, settings.chunk_width)
    return Run(
        m["mode"],
        plan,
        settings,
        captions,
        noise_shape,
        m["seed"],
        None,
        m["per_chunk_noise"],
        prefix,
        limit,
        start_step=m["next_step"],
        window=window,
        frames_done=m["frames_done"],
        chunks_done=m["chunks_done"],
        tail=state_tail(state),
        earlier_frames=m.get("earlier_frames", 0),
        noise_parts=noise_parts,
    )


def saved_settings(meta: dict) -> SamplerSettings:
    """The sampler settings a state recorded."""
    return SamplerSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["settings"].items()})


# ---- resuming with another length (docs/CLI.md, "--resume with another --num_frames") ----------
def resume_length(
    state: GenerationState, runtime: object, num_frames: object = None, flag: str = "num_frames"
) -> tuple[int, int | None]:
    """(chunk_num, frame limit) of the run that continues ``state`` as a ``num_frames``-frame video.

    The one rule for the CLI (``--resume STATE --num_frames N``) and ``MagiPipeline.resume``: any
    length works whose chunk plan takes the same steps as the saved one up to the resume point
    (the chunks finished and in flight stay as they are) and that keeps the frames already
    written. A longer video's added chunks get noise of their own (``resumed_noise``).

    Args:
        state: the unfinished state.
        runtime: the run's ``RuntimeConfig`` (the same config the state was made with).
        num_frames: the video's new length in frames; None keeps the state's.
        flag: how errors name it ("--num_frames" on the command line).

    Raises:
        RequestError: fewer frames than already written, or a plan that differs before the
            resume point (a shorter run had begun ending its video: finish it, then extend it).
    """
    m = state.meta
    if num_frames is None:
        return m["chunk_num"], m["limit"]
    frames = check_frames(num_frames, flag)
    if frames < m["frames_done"]:
        raise RequestError(
            f"{flag} {frames}: the stopped run has written {m['frames_done']} frames already; "
            f"give at least that many, or drop {flag}",
            flag,
        )
    compat = "official" if m["limit"] is None else "magi"  # official runs keep every frame
    settings, p, tf = saved_settings(m), m["prefix_frames"], runtime.temporal_downsample_factor
    tile = budget.tile_frames(runtime.fps, compat) // tf
    chunks = budget.chunk_count(
        m["mode"], frames, p, settings.chunk_width, compat=compat, temporal_factor=tf, tile_latents=tile
    )
    if chunks != m["chunk_num"] and not plans_agree(
        settings.plan(m["chunk_num"], p), settings.plan(chunks, p), state.next_step
    ):
        if chunks > m["chunk_num"]:
            raise RequestError(
                f"{flag} {frames}: the stopped run had begun the steps that end its video, so a longer "
                "plan differs before its resume point; finish the run, then extend it",
                flag,
            )
        raise RequestError(
            f"{flag} {frames}: the stopped run has started more chunks than a {frames}-frame video "
            f"has ({chunks}); give more frames, or drop {flag}",
            flag,
        )
    return chunks, None if compat == "official" else frames


def plans_agree(saved: ChunkPlan, other: ChunkPlan, start: int) -> bool:
    """Whether ``other`` takes exactly the steps of ``saved`` before step ``start``."""
    if other.total_steps <= start:
        return False
    return all(a == b for a, b in zip(islice(saved.steps(), start), islice(other.steps(), start)))


def added_noise_seed(seed: int, first_chunk: int) -> int:
    """The seed of the noise of chunks added on resume from ``first_chunk`` on: seed + first_chunk
    (wrapped into torch.manual_seed's range), as ``per_chunk_noise`` seeds chunk k with seed + k."""
    return (seed + first_chunk) % 2**64


def resumed_noise(meta: dict, chunk_num: int, chunk_width: int) -> tuple[tuple[int, ...], tuple[tuple[int, int], ...]]:
    """(noise_shape, noise_parts) of a resumed run of ``chunk_num`` chunks.

    Every chunk keeps the noise it had: the state's whole-video draw covers its chunks, and
    chunks past every earlier draw get one more draw, [1, C, n·cw, H, W] from
    ``added_noise_seed(seed, first)``. (Redrawing the longer shape instead would move every
    chunk's values, the C channels being laid out one after the other, and the chunks in flight
    already hold theirs.) Per-chunk noise needs no part: chunk k is drawn from seed + k.
    """
    shape = list(meta["noise_shape"])
    parts = tuple(tuple(part) for part in meta.get("noise_parts", ()))
    if meta["per_chunk_noise"]:
        shape[2] = max(shape[2], chunk_num * chunk_width)  # the shape only bounds the chunk index
        return tuple(shape), ()
    covered = shape[2] // chunk_width + sum(n for _, n in parts)
    if chunk_num > covered:
        parts = (*parts, (covered, chunk_num - covered))
    return tuple(shape), parts


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
        "noise_parts": [list(part) for part in run.noise_parts],
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
