"""Per-chunk caption rows for the sampler, built on demand from the distinct prompts' T5 features.

``ChunkCaptions`` gives the same rows as ``magi.conditioning.build_caption_table`` without holding
the whole table (2 x chunk_num x Lcap x Ccap floats), and takes steering edits
(``assign_prompt``); a generation state stores its prompts, features and per-chunk prompt index.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from magi.conditioning import MAX_DURATION_TOKEN, SpecialTokenOptions, SpecialTokens, build_caption_table
from magi.sampling.denoise import NULL, PROMPT

# (prompt, duration) rows kept: more than one call's chunks ever need (window + 2), so a row is
# built once per run; bounded, so steering to ever new prompts does not grow memory
ROW_CACHE = 16


class ChunkCaptions:
    """Per-chunk caption rows built on demand (same values as ``build_caption_table``).

    A chunk's prompt caption depends only on its prompt and its duration token (chunks remaining,
    capped at 8), so rows are built once per (prompt, duration) and memory does not grow with
    the number of chunks (the full table is 2 x chunk_num x 800 x 4096 floats).

    Args:
        emb, mask: T5 features [Pn, Lcap, Ccap] and masks [Pn, Lcap] of the distinct prompts.
        null: the DiT's null caption table [Lcap, Ccap].
        tokens, options: special tokens and switches (as for ``build_caption_table``).
        chunk_prompts: prompt index of every generated chunk.
        offset: whole prefix chunks (generated chunk i is absolute chunk offset + i).
    """

    def __init__(
        self,
        emb: torch.Tensor,
        mask: torch.Tensor,
        null: torch.Tensor,
        tokens: SpecialTokens,
        options: SpecialTokenOptions,
        chunk_prompts: Sequence[int],
        offset: int = 0,
        texts: Sequence[str] = (),
    ) -> None:
        self.texts = list(texts)  # the distinct prompts' text (emb[k] encodes texts[k])
        self.emb, self.mask, self.null = emb, mask, null.float()
        self.tokens, self.options = tokens, options
        self.chunk_prompts, self.offset = list(chunk_prompts), offset
        self._rows: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        y, m = self._table(0, 1)
        self._null_row = (y[NULL, 0].clone(), m[NULL, 0].clone())

    def _table(self, prompt: int, duration: int) -> tuple[torch.Tensor, torch.Tensor]:
        # A video of `duration` chunks: its chunk 0 carries DURATION_TOKEN_<duration>.
        return build_caption_table(
            self.emb[prompt : prompt + 1],
            self.mask[prompt : prompt + 1],
            self.null,
            self.tokens,
            chunk_num=duration,
            options=self.options,
        )

    def row(self, kind: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(y [Lcap, Ccap], mask [Lcap]) of absolute chunk ``chunk``, row kind PROMPT or NULL."""
        i = chunk - self.offset
        if kind == NULL:
            return self._null_row
        if i < 0:  # clean prefix chunks: nothing to read (the model never asks for these)
            return self.null, torch.zeros_like(self._null_row[1])
        remaining = len(self.chunk_prompts) - i
        duration = min(remaining, MAX_DURATION_TOKEN) if self.options.duration else 1
        key = (self.chunk_prompts[i], duration)
        row = self._rows.pop(key, None)
        if row is None:
            y, m = self._table(*key)
            # copies: a view would keep the whole [2, duration, Lcap, Ccap] table alive
            row = (y[PROMPT, 0].clone(), m[PROMPT, 0].clone())
        self._rows[key] = row  # most recently used last; a steered run's old prompts age out
        while len(self._rows) > ROW_CACHE:
            self._rows.pop(next(iter(self._rows)))
        return row

    def assign_prompt(self, text: str, emb: torch.Tensor, mask: torch.Tensor, first: int) -> int:
        """Give absolute chunks ``first`` .. the last one the prompt ``text`` (steering).

        The prompt is appended (emb [Lcap, Ccap] or [1, Lcap, Ccap], mask [Lcap] or [1, Lcap]:
        its T5 features) unless ``texts`` already holds it; emb[k] keeps encoding texts[k], so a
        saved state carries the steered timeline. Rows are keyed by (prompt, duration), so the
        cached ones stay valid and the new rows equal those of a run started with this timeline.

        Returns:
            The prompt index the chunks now use.
        """
        if text in self.texts and len(self.texts) == self.emb.shape[0]:
            k = self.texts.index(text)
        else:
            k = self.emb.shape[0]
            emb = emb.reshape(1, *self.emb.shape[1:]).to(self.emb)
            self.emb = torch.cat([self.emb, emb])
            self.mask = torch.cat([self.mask, mask.reshape(1, -1).to(self.mask)])
            self.texts.append(text)
        for i in range(max(0, first - self.offset), len(self.chunk_prompts)):
            self.chunk_prompts[i] = k
        return k

    def rows(self, kinds: Sequence[int], chunks: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked captions of chunks[j] from row kinds[j]: ([R, Lcap, Ccap], [R, Lcap])."""
        pairs = [self.row(k, c) for k, c in zip(kinds, chunks)]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def token_users(options: SpecialTokenOptions) -> list[str]:
    """The switched-on special tokens that read special_tokens.npz (empty: the file is not needed)."""
    return options.prompt_tokens() + (["NEG_PROMPT"] if options.negative_prompt else [])


def zero_tokens(width: int) -> SpecialTokens:
    """Special tokens of zeros: none is switched on, so the file is not needed, only its width."""
    zeros = torch.zeros(1, width)
    return SpecialTokens(zeros, zeros, torch.zeros(17, width))
