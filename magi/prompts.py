"""Prompts -> caption rows: the T5 encoder (loaded per new prompt, then freed), a small cache of
encodings across requests, and the special tokens (special_tokens.npz) the captions carry.

``PromptEncoder.captions`` turns a request's per-chunk prompts into ``ChunkCaptions`` (the rows
the sampler reads); ``captions_from_state`` rebuilds them from a saved state without T5.

Legend: Pn distinct prompts, Lcap caption slots, Ccap caption width.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from magi.captions import ChunkCaptions, token_users, zero_tokens
from magi.conditioning import (
    DEFAULT_SPECIAL_TOKEN_PATH,
    SPECIAL_TOKEN_ENV,
    SpecialTokenOptions,
    SpecialTokens,
    load_special_tokens,
)
from magi.config import MagiConfig

PROMPT_CACHE_SIZE = 8  # encoded prompts remembered across requests


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
        f"special_tokens.npz not found: set {SPECIAL_TOKEN_ENV} or put it beside the config (magi.download fetches it)"
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
        raise FileNotFoundError(
            f"{err} (needed for {', '.join(users)}; PAD_HQ and PAD_DURATION are on unless set to 0)"
        ) from None


class PromptEncoder:
    """T5 features of prompts, remembered a few at a time; special tokens read once.

    Args:
        config: the run's config (``runtime_config.t5_pretrained`` / ``t5_device``; where
            special_tokens.npz is looked for).
        mesh: the process mesh of a multi-GPU run: T5 runs on rank 0 and the others receive its
            output (None: single process).
        cache_size: encodings kept across requests (least recently used dropped first).
    """

    def __init__(self, config: MagiConfig, mesh: object | None = None, cache_size: int = PROMPT_CACHE_SIZE) -> None:
        self.config, self.mesh, self.cache_size = config, mesh, cache_size
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._special_tokens: SpecialTokens | None = None

    @property
    def cached(self) -> list[str]:
        """The remembered prompts, least recently used first."""
        return list(self._cache)

    def forget(self) -> None:
        """Drop every remembered encoding (and the special tokens, read again when needed)."""
        self._cache.clear()
        self._special_tokens = None

    def remember(self, prompt: str, emb: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
        self._cache.pop(prompt, None)
        self._cache[prompt] = pair
        while len(self._cache) > self.cache_size:
            self._cache.pop(next(iter(self._cache)))
        return pair

    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """T5 features of prompts ([n, Lcap, Ccap], [n, Lcap]); T5 is loaded only for new ones."""
        # This request's encodings are held here for the request; the cache only saves T5 runs
        # across requests.
        held = {p: self._cache[p] for p in prompts if p in self._cache}
        for p in held:
            self._cache[p] = self._cache.pop(p)  # most recently used last
        missing = [p for p in dict.fromkeys(prompts) if p not in held]
        if missing:
            emb, mask = self._run_t5(missing)
            for p, e, m in zip(missing, emb, mask):
                held[p] = self.remember(p, e, m)
        pairs = [held[p] for p in prompts]
        return torch.stack([e for e, _ in pairs]), torch.stack([m for _, m in pairs])

    def _run_t5(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        from magi.models.text_encoder import T5Encoder

        rt = self.config.runtime
        if not rt.t5_pretrained:
            raise ValueError("runtime_config.t5_pretrained is not set: point it at the T5 folder")
        t5_device = rt.t5_device if rt.t5_device == "cpu" or torch.cuda.is_available() else "cpu"

        def run_t5() -> tuple[torch.Tensor, torch.Tensor]:
            with T5Encoder.from_pretrained(rt.t5_pretrained, device=t5_device) as t5:
                return t5.encode(prompts)

        if self.mesh is None:
            return run_t5()
        from magi.distributed import share_from_rank0  # T5 runs on rank 0; the others receive it

        return share_from_rank0(run_t5, self.mesh)

    def tokens(self, options: SpecialTokenOptions, width: int) -> SpecialTokens:
        """The special tokens the switched-on options read (zeros when none is on)."""
        if not token_users(options):
            return zero_tokens(width)
        if self._special_tokens is None:
            self._special_tokens = load_special_tokens(find_special_tokens(self.config))
        return self._special_tokens

    def captions(
        self, prompts: Sequence[str], generated: int, offset: int, null: torch.Tensor, device: torch.device
    ) -> ChunkCaptions:
        """Caption rows of a request: prompt i for generated chunk i, the last one repeating.

        Args:
            prompts: the request's prompt list.
            generated: generated chunks (only their prompts are encoded).
            offset: whole prefix chunks (generated chunk i is absolute chunk offset + i).
            null: the DiT's null caption table [Lcap, Ccap].
            device: where the rows live.
        """
        used = [prompts[min(i, len(prompts) - 1)] for i in range(generated)]
        distinct = list(dict.fromkeys(used))
        emb, mask = self.encode(distinct)
        position = {p: k for k, p in enumerate(distinct)}
        options = SpecialTokenOptions.from_env()
        return ChunkCaptions(
            emb.to(device),
            mask.to(device),
            null.to(device),
            self.tokens(options, emb.shape[-1]).to(device),
            options,
            [position[p] for p in used],
            offset,
            distinct,
        )

    def captions_from_state(
        self,
        emb: torch.Tensor,
        mask: torch.Tensor,
        texts: Sequence[str],
        chunk_prompts: Sequence[int],
        options: SpecialTokenOptions,
        offset: int,
        null: torch.Tensor,
        device: torch.device,
    ) -> ChunkCaptions:
        """Caption rows rebuilt from a saved state's features (no T5)."""
        tokens = self.tokens(options, emb.shape[-1]).to(device)
        return ChunkCaptions(
            emb.to(device), mask.to(device), null.to(device), tokens, options, chunk_prompts, offset, texts
        )
