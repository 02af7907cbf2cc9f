"""Caption conditioning: special tokens, null captions and the per-chunk caption table.

Behaviour follows shared/spec/text.md §3-4. The sampler consumes one table per video:

* ``y [2, chunk_num, Lcap, Ccap]`` float32: row 0 the prompt captions with the special tokens
  prepended (``[DURATION_k, HQ, prompt...]`` with the official switches), row 1 the null captions
  (the DiT's learned ``y_embedder.null_caption_embedding``, optionally behind the negative tokens);
* ``mask [2, chunk_num, Lcap]`` float32: 1 for caption tokens the cross-attention reads. Null
  captions read their first 50 rows; clean prefix chunks (v2v) read nothing in row 0.

Shapes: P prompts, R chunks, Lcap caption slots (800), Ccap caption width (4096 for T5-XXL).
"""

from __future__ import annotations

import os
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

SPECIAL_TOKEN_ENV = "SPECIAL_TOKEN_PATH"
DEFAULT_SPECIAL_TOKEN_PATH = Path("example/assets/special_tokens.npz")  # relative to the cwd
SPECIAL_TOKEN_URL = "https://raw.githubusercontent.com/SandAI-org/MAGI-1/main/example/assets/special_tokens.npz"
NULL_CAPTION_TOKENS = 50  # the unconditional caption reads the first 50 null-table rows
MAX_DURATION_TOKEN = 8  # DURATION_TOKEN_1..8 = chunks remaining, capped

# Name -> (array in special_tokens.npz, row). DURATION_TOKEN_k lives in other_tokens[6 + k].
TOKEN_ROWS: dict[str, tuple[str, int]] = {
    "CAPTION_TOKEN": ("caption_token", 0),
    "LOGO_TOKEN": ("logo_token", 0),
    "TRANS_TOKEN": ("other_tokens", 0),
    "HQ_TOKEN": ("other_tokens", 1),
    "STATIC_FIRST_FRAMES_TOKEN": ("other_tokens", 2),
    "DYNAMIC_FIRST_FRAMES_TOKEN": ("other_tokens", 3),
    "BORDERNESS_TOKEN": ("other_tokens", 4),
    **{f"DURATION_TOKEN_{k}": ("other_tokens", 6 + k) for k in range(1, MAX_DURATION_TOKEN + 1)},
    "THREE_D_MODEL_TOKEN": ("other_tokens", 15),
    "TWO_D_ANIME_TOKEN": ("other_tokens", 16),
}
# Prepended to the null captions under NEG_PROMPT, in application order (the last ends up first).
NEGATIVE_TOKENS = ("CAPTION_TOKEN", "LOGO_TOKEN", "TRANS_TOKEN", "BORDERNESS_TOKEN")

_TRUE_VALUES = frozenset({"1", "true", "yes", "y", "on", "enabled"})


def env_flag(value: str) -> bool:
    """Official boolean env parsing: true for 1/true/yes/y/on/enabled, case-insensitive."""
    return value.lower() in _TRUE_VALUES


# ----------------------------------------------------------------------------------------------
# Switches
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpecialTokenOptions:
    """Which special tokens to prepend. Defaults = what the official run.sh sets (PAD_HQ=1,
    PAD_DURATION=1). Field order is the official application order of the prompt tokens.

    Args:
        static_first_frames: PAD_STATIC.
        dynamic_first_frames: PAD_DYNAMIC.
        borderness: PAD_BORDERNESS.
        hq: PAD_HQ, the high-quality token.
        three_d_model: PAD_THREE_D_MODEL.
        two_d_anime: PAD_TWO_D_ANIME.
        duration: PAD_DURATION, the per-chunk "chunks remaining" token (applied last, so first).
        negative_prompt: NEG_PROMPT, negative tokens in front of the null captions.
    """

    static_first_frames: bool = False
    dynamic_first_frames: bool = False
    borderness: bool = False
    hq: bool = True
    three_d_model: bool = False
    two_d_anime: bool = False
    duration: bool = True
    negative_prompt: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> SpecialTokenOptions:
        """Read the official env vars; a variable that is not set keeps the field default.

        Args:
            environ: mapping to read (default ``os.environ``).
        """
        environ = os.environ if environ is None else environ
        values = {name: env_flag(environ[var]) for name, var in _ENV_VARS.items() if var in environ}
        return cls(**values)

    def prompt_tokens(self) -> list[str]:
        """Prompt-token keys in application order ("DURATION_TOKEN" = the per-chunk one)."""
        return [key for name, key in _PROMPT_KEYS.items() if getattr(self, name)]


_ENV_VARS = {
    "static_first_frames": "PAD_STATIC",
    "dynamic_first_frames": "PAD_DYNAMIC",
    "borderness": "PAD_BORDERNESS",
    "hq": "PAD_HQ",
    "three_d_model": "PAD_THREE_D_MODEL",
    "two_d_anime": "PAD_TWO_D_ANIME",
    "duration": "PAD_DURATION",
    "negative_prompt": "NEG_PROMPT",
}
_PROMPT_KEYS = {  # insertion order = official application order
    "static_first_frames": "STATIC_FIRST_FRAMES_TOKEN",
    "dynamic_first_frames": "DYNAMIC_FIRST_FRAMES_TOKEN",
    "borderness": "BORDERNESS_TOKEN",
    "hq": "HQ_TOKEN",
    "three_d_model": "THREE_D_MODEL_TOKEN",
    "two_d_anime": "TWO_D_ANIME_TOKEN",
    "duration": "DURATION_TOKEN",
}


# ----------------------------------------------------------------------------------------------
# Special-token file
# ----------------------------------------------------------------------------------------------


def special_token_path(path: str | os.PathLike[str] | None = None) -> Path:
    """Locate special_tokens.npz: ``path`` if given, else $SPECIAL_TOKEN_PATH, else
    ``example/assets/special_tokens.npz`` under the current directory (the official lookup).

    Args:
        path: explicit file; overrides the environment and the default.
    """
    if path is not None:
        found, source = Path(path), "given path"
    elif os.environ.get(SPECIAL_TOKEN_ENV):
        found, source = Path(os.environ[SPECIAL_TOKEN_ENV]), f"${SPECIAL_TOKEN_ENV}"
    else:
        found, source = Path.cwd() / DEFAULT_SPECIAL_TOKEN_PATH, "default, relative to the cwd"
    if not found.is_file():
        raise FileNotFoundError(
            f"special_tokens.npz not found at {found} ({source}); `python -m magi.download "
            f"<model>` fetches it into downloads/ (official file: {SPECIAL_TOKEN_URL}); pass "
            f"its path or set {SPECIAL_TOKEN_ENV}"
        )
    return found


@dataclass(frozen=True)
class SpecialTokens:
    """The official special-token vectors, rounded float64 -> float16 -> float32.

    Args:
        caption_token: [1, Ccap].
        logo_token: [1, Ccap].
        other_tokens: [>= 17, Ccap].
    """

    caption_token: Tensor
    logo_token: Tensor
    other_tokens: Tensor

    @property
    def width(self) -> int:
        return int(self.other_tokens.shape[-1])

    def token(self, name: str) -> Tensor:
        """One token vector [Ccap] by official name (e.g. "HQ_TOKEN", "DURATION_TOKEN_3")."""
        if name not in TOKEN_ROWS:
            raise ValueError(f"unknown special token {name!r}; known: {sorted(TOKEN_ROWS)}")
        array, row = TOKEN_ROWS[name]
        return getattr(self, array)[row]

    def to(self, device: torch.device | str) -> SpecialTokens:
        """The same tokens on another device."""
        return SpecialTokens(self.caption_token.to(device), self.logo_token.to(device), self.other_tokens.to(device))

    def duration(self, chunks_remaining: int) -> Tensor:
        """DURATION_TOKEN_k [Ccap] for a chunk with ``chunks_remaining`` >= 1 (k capped at 8)."""
        return self.token(f"DURATION_TOKEN_{min(chunks_remaining, MAX_DURATION_TOKEN)}")


def load_special_tokens(path: str | os.PathLike[str] | None = None) -> SpecialTokens:
    """Read special_tokens.npz (lookup as :func:`special_token_path`) with the official rounding.

    The float16 step is part of the official numerics and must round straight from float64
    (numpy's astype does; torch's float64 -> float16 goes through float32 and differs).

    Args:
        path: explicit file; default: $SPECIAL_TOKEN_PATH, else example/assets/special_tokens.npz.
    """
    found = special_token_path(path)
    arrays = _read_special_arrays(found)
    return SpecialTokens(**{name: torch.from_numpy(arr.astype(np.float16)).float() for name, arr in arrays.items()})


def check_special_tokens_file(path: str | os.PathLike[str] | None = None) -> Path:
    """Start-up check of special_tokens.npz (lookup as :func:`special_token_path`): the file
    opens and holds the three arrays with the right shapes. Fast (the file is a few MB).

    Args:
        path: explicit file; default: $SPECIAL_TOKEN_PATH, else example/assets/special_tokens.npz.

    Returns:
        The checked file.
    """
    found = special_token_path(path)
    _read_special_arrays(found)
    return found


_SPECIAL_ARRAYS = (("caption_token", 1), ("logo_token", 1), ("other_tokens", 17))  # name, min rows


def _read_special_arrays(found: Path) -> dict[str, np.ndarray]:
    """The three token arrays of special_tokens.npz, float64 as stored; one-line errors."""
    try:
        with np.load(found, allow_pickle=False) as data:
            missing = [name for name, _ in _SPECIAL_ARRAYS if name not in data.files]
            if missing:
                raise _BadTokens(f"has no array {missing[0]!r} (it holds {sorted(data.files)})")
            arrays = {name: data[name] for name, _ in _SPECIAL_ARRAYS}
    except _BadTokens as err:
        raise ValueError(_bad_tokens_message(found, str(err))) from None
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error) as err:
        # truncated zip, not an npz at all, an object array (pickle), a damaged member
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise ValueError(_bad_tokens_message(found, f"is not a readable .npz ({reason})")) from None
    for name, min_rows in _SPECIAL_ARRAYS:
        arr = arrays[name]
        if arr.ndim != 2 or arr.shape[0] < min_rows:
            raise ValueError(
                _bad_tokens_message(found, f"{name} has shape {list(arr.shape)}, expected [>={min_rows}, C]")
            )
        if not np.issubdtype(arr.dtype, np.floating) or not np.isfinite(arr).all():
            raise ValueError(_bad_tokens_message(found, f"{name} is not finite floating data (dtype {arr.dtype})"))
    widths = {a.shape[1] for a in arrays.values()}
    if len(widths) != 1:
        raise ValueError(_bad_tokens_message(found, f"arrays disagree on the token width {sorted(widths)}"))
    return arrays


class _BadTokens(Exception):
    """A special_tokens.npz that opened but has the wrong content (internal)."""


def _bad_tokens_message(found: Path, reason: str) -> str:
    return (
        f"special tokens file {found} {reason}: it is truncated, damaged or not the official "
        f"file; get a good one with `python -m magi.download <model>` or from {SPECIAL_TOKEN_URL} "
        "(example/assets/special_tokens.npz)"
    )


# ----------------------------------------------------------------------------------------------
# Caption table
# ----------------------------------------------------------------------------------------------


def _prepend(tokens: list[Tensor], emb: Tensor, length: int) -> Tensor:
    """[*tokens, emb rows][:length]; tokens given in application order (last applied first)."""
    if not tokens:
        return emb[:length]
    return torch.cat([torch.stack(tokens[::-1]).to(emb.dtype), emb])[:length]


def _stack_prompts(emb: Tensor | Sequence[Tensor], mask: Tensor | Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Normalise prompt embeddings to emb [P, Lcap, Ccap] float32 and mask [P, Lcap] float32."""
    if not isinstance(emb, Tensor):
        emb = torch.cat([e.reshape(-1, *e.shape[-2:]) for e in emb])
    if not isinstance(mask, Tensor):
        mask = torch.cat([m.reshape(-1, m.shape[-1]) for m in mask])
    emb = emb.reshape(-1, *emb.shape[-2:]).float()  # [1, Lcap, Ccap] / [1, 1, Lcap, Ccap] too
    mask = mask.reshape(-1, mask.shape[-1]).float()
    if emb.shape[:2] != mask.shape:
        raise ValueError(
            f"prompt embeddings {tuple(emb.shape)} and masks {tuple(mask.shape)} "
            "disagree; expected [P, Lcap, Ccap] and [P, Lcap]"
        )
    empty = (mask.sum(-1) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"prompt mask(s) {empty} have no valid token; encode the prompt with T5")
    return emb, mask


def _chunk_prompt_index(num_prompts: int, num_generated: int, chunk_prompts: Sequence[int] | None) -> list[int]:
    """Prompt index of each generated chunk."""
    if chunk_prompts is None:
        if num_prompts == 1:
            return [0] * num_generated
        if num_prompts == num_generated:
            return list(range(num_generated))
        raise ValueError(
            f"{num_prompts} prompts for {num_generated} generated chunks: give one "
            "prompt, one per generated chunk, or chunk_prompts (chunk -> prompt)"
        )
    index = [int(i) for i in chunk_prompts]
    if len(index) != num_generated or not all(0 <= i < num_prompts for i in index):
        raise ValueError(
            f"chunk_prompts must list {num_generated} prompt indices in "
            f"[0, {num_prompts}), one per generated chunk; got {index}"
        )
    return index


def _null_captions(null: Tensor, tokens: SpecialTokens, options: SpecialTokenOptions) -> tuple[Tensor, Tensor]:
    """One null caption [Lcap, Ccap] and its mask [Lcap] (first 50 ones, never extended)."""
    length = null.shape[0]
    negatives = [tokens.token(n) for n in NEGATIVE_TOKENS] if options.negative_prompt else []
    mask = torch.zeros(length)
    mask[:NULL_CAPTION_TOKENS] = 1
    return _prepend(negatives, null, length), mask


def build_caption_table(
    prompt_emb: Tensor | Sequence[Tensor],
    prompt_mask: Tensor | Sequence[Tensor],
    null_caption_embedding: Tensor,
    special_tokens: SpecialTokens,
    *,
    chunk_num: int,
    clean_chunk_num: int = 0,
    chunk_prompts: Sequence[int] | None = None,
    options: SpecialTokenOptions | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-chunk caption table the sampler reads (official layout, text.md §4).

    Args:
        prompt_emb: T5 features [P, Lcap, Ccap] (as :meth:`T5Encoder.encode` returns), or a list
            of P tensors [Lcap, Ccap] / [1, Lcap, Ccap].
        prompt_mask: T5 masks [P, Lcap] (or a list of P [Lcap] / [1, Lcap]).
        null_caption_embedding: the DiT's ``y_embedder.null_caption_embedding`` [Lcap, Ccap].
        special_tokens: from :func:`load_special_tokens`.
        chunk_num: chunks of the whole latent (infer_chunk_num), prefix chunks included.
        clean_chunk_num: whole prefix chunks (v2v) that are never generated.
        chunk_prompts: prompt index for each generated chunk (absolute chunk clean_chunk_num + i);
            default: prompt 0 everywhere when P = 1 (the official behaviour), else chunk i -> i.
        options: token switches; default :class:`SpecialTokenOptions` (the run.sh settings).

    Returns:
        y [2, chunk_num, Lcap, Ccap] float32 and mask [2, chunk_num, Lcap] float32 (on the device of
        prompt_emb); row 0 conditional, row 1 null.
    """
    options = SpecialTokenOptions() if options is None else options
    emb, mask = _stack_prompts(prompt_emb, prompt_mask)  # [P, Lcap, Ccap], [P, Lcap]
    null = null_caption_embedding.to(device=emb.device, dtype=torch.float32)
    _check_sizes(emb, null, special_tokens, chunk_num, clean_chunk_num)
    n_gen = chunk_num - clean_chunk_num
    index = _chunk_prompt_index(emb.shape[0], n_gen, chunk_prompts)
    tokens = special_tokens.to(emb.device)
    length = emb.shape[1]

    cond_y, cond_mask = [], []
    for i, p in enumerate(index):
        prefix = [
            tokens.duration(n_gen - i) if key == "DURATION_TOKEN" else tokens.token(key)
            for key in options.prompt_tokens()
        ]
        cond_y.append(_prepend(prefix, emb[p], length))
        cond_mask.append(torch.cat([mask.new_ones(len(prefix)), mask[p]])[:length])
    null_y, null_mask = _null_captions(null, tokens, options)
    # Clean prefix chunks: the raw null table with nothing to read (the model never uses them).
    cond_y = [null] * clean_chunk_num + cond_y
    cond_mask = [mask.new_zeros(length)] * clean_chunk_num + cond_mask

    y = torch.stack([torch.stack(cond_y), null_y.expand(chunk_num, -1, -1)])  # [2, R, Lcap, Ccap]
    y_mask = torch.stack([torch.stack(cond_mask), null_mask.to(emb.device).expand(chunk_num, -1)])
    return y, y_mask


def _check_sizes(emb: Tensor, null: Tensor, tokens: SpecialTokens, chunk_num: int, clean_chunk_num: int) -> None:
    if null.shape != emb.shape[1:]:
        raise ValueError(
            f"null_caption_embedding {tuple(null.shape)} does not match the prompt "
            f"features {tuple(emb.shape[1:])} ([Lcap, Ccap])"
        )
    if tokens.width != emb.shape[-1]:
        raise ValueError(
            f"special tokens are {tokens.width} wide but captions {emb.shape[-1]}; "
            "use the special_tokens.npz that belongs to this text encoder"
        )
    if emb.shape[1] < NULL_CAPTION_TOKENS:
        raise ValueError(f"caption length {emb.shape[1]} < {NULL_CAPTION_TOKENS} null tokens")
    if not 0 <= clean_chunk_num < chunk_num:
        raise ValueError(f"need 0 <= clean_chunk_num < chunk_num, got {clean_chunk_num}, {chunk_num}")


def chunk_captions(y: Tensor, mask: Tensor, start: int, stop: int) -> tuple[Tensor, Tensor]:
    """Captions of chunks [start, stop) for one DiT call, conditional half first.

    Args:
        y: [2, chunk_num, Lcap, Ccap] from :func:`build_caption_table`.
        mask: [2, chunk_num, Lcap].
        start: first chunk (absolute index).
        stop: one past the last chunk.

    Returns:
        y [2*R, Lcap, Ccap] and mask [2*R, Lcap], segment b*R + j = chunk start + j of row b.
    """
    if not 0 <= start < stop <= y.shape[1]:
        raise ValueError(f"chunk range [{start}, {stop}) outside [0, {y.shape[1]})")
    return y[:, start:stop].flatten(0, 1), mask[:, start:stop].flatten(0, 1)
