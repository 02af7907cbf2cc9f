"""The T5 v1.1 encoder and its SentencePiece tokenizer in plain PyTorch (no transformers import).

Importing transformers costs more CPU time than the whole tiny demo's denoising (it pulls in
torch's compiler stack, its distributed tensors and scipy); the encoder itself is a few dozen lines.
Parameter names are the Hugging Face T5 checkpoint's (``shared.weight``,
``encoder.block.N.layer.0.SelfAttention.q.weight``, ...), so the official files load with no
rename table. The arithmetic is transformers' eager T5 path op for op (same order of additions,
same dtype casts), so the features are bit-identical to ``T5EncoderModel`` (tests/models).

Legend: B batch, L tokens, N heads, Dk head dim, D model width, F feed-forward width.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

EOS_ID, PAD_ID = 1, 0  # T5's fixed ids (the official caption padding uses 0)


@dataclass(frozen=True)
class T5Settings:
    """The encoder's shape, read from a Hugging Face T5 ``config.json``."""

    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_heads: int
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6
    gated: bool = True
    act: str = "gelu_new"

    @classmethod
    def from_json(cls, data: dict) -> T5Settings:
        """Settings from the parsed config.json; a missing or bad field raises KeyError/TypeError/ValueError."""
        # transformers' T5Config: "gated-gelu" means gelu_new on the gated branch; "relu" is plain.
        proj = str(data.get("feed_forward_proj", "relu"))
        act = "gelu_new" if proj == "gated-gelu" else str(data.get("dense_act_fn", proj.split("-")[-1]))
        if act not in _ACTIVATIONS:
            raise ValueError(f"activation {act!r} (feed_forward_proj {proj!r}) is not one of {sorted(_ACTIVATIONS)}")
        ints = {k: int(data[k]) for k in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads")}
        return cls(
            **ints,
            num_buckets=int(data.get("relative_attention_num_buckets", 32)),
            max_distance=int(data.get("relative_attention_max_distance", 128)),
            eps=float(data.get("layer_norm_epsilon", 1e-6)),
            gated=proj.startswith("gated-"),
            act=act,
        )


def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    # The tanh GELU written out as transformers' NewGELUActivation computes it (same rounding).
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


_ACTIVATIONS = {"gelu_new": _gelu_new, "relu": F.relu, "gelu": F.gelu}


def _embedding(rows: int, width: int) -> nn.Embedding:
    """An uninitialised embedding (the checkpoint gives the values): its random init on the meta
    device would run a Python decomposition that imports torch._dynamo (about a second)."""
    return nn.Embedding.from_pretrained(torch.empty(rows, width), freeze=False)


class RMSNorm(nn.Module):
    """T5's layer norm: scale only, variance (no mean) accumulated in float32."""

    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


def relative_buckets(relative: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Bidirectional T5 bucket of each relative position (key - query), int64 in [0, num_buckets)."""
    half = num_buckets // 2
    buckets = (relative > 0).to(torch.long) * half
    distance = torch.abs(relative)
    exact = half // 2  # the nearer half of the buckets are single positions, the rest log-spaced
    far = exact + (torch.log(distance.float() / exact) / math.log(max_distance / exact) * (half - exact)).to(torch.long)
    far = torch.min(far, torch.full_like(far, half - 1))
    return buckets + torch.where(distance < exact, distance, far)


class SelfAttention(nn.Module):
    """Unscaled multi-head attention with T5's learned relative-position bias (first block only)."""

    def __init__(self, s: T5Settings, has_bias: bool) -> None:
        super().__init__()
        inner = s.num_heads * s.d_kv
        self.heads, self.head_dim, self.settings = s.num_heads, s.d_kv, s
        self.q = nn.Linear(s.d_model, inner, bias=False)
        self.k = nn.Linear(s.d_model, inner, bias=False)
        self.v = nn.Linear(s.d_model, inner, bias=False)
        self.o = nn.Linear(inner, s.d_model, bias=False)
        if has_bias:
            self.relative_attention_bias = _embedding(s.num_buckets, s.num_heads)

    def position_bias(self, length: int, device: torch.device) -> torch.Tensor:
        """[1, N, L, L] bias added to every block's scores."""
        pos = torch.arange(length, dtype=torch.long, device=device)
        relative = pos[None, :] - pos[:, None]  # [L, L] key - query
        buckets = relative_buckets(relative, self.settings.num_buckets, self.settings.max_distance)
        return self.relative_attention_bias(buckets).permute([2, 0, 1]).unsqueeze(0)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """x [B, L, D], bias [1, N, L, L], keep [B, 1, 1, L] bool (False: padding key) -> [B, L, D]."""
        b, length = x.shape[:2]
        q, k, v = (proj(x).view(b, length, -1, self.head_dim).transpose(1, 2) for proj in (self.q, self.k, self.v))
        scores = torch.matmul(q, k.transpose(2, 3)) + bias  # [B, N, L, L]
        # A padding key gets the dtype's minimum: its softmax weight is exactly 0.
        scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
        out = torch.matmul(F.softmax(scores, dim=-1), v)  # [B, N, L, Dk]
        return self.o(out.transpose(1, 2).reshape(b, length, -1))


class AttentionLayer(nn.Module):
    def __init__(self, s: T5Settings, has_bias: bool) -> None:
        super().__init__()
        self.SelfAttention = SelfAttention(s, has_bias)
        self.layer_norm = RMSNorm(s.d_model, s.eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return x + self.SelfAttention(self.layer_norm(x), bias, keep)


class FeedForward(nn.Module):
    """act(wi_0 x) * wi_1 x -> wo (gated), or act(wi x) -> wo."""

    def __init__(self, s: T5Settings) -> None:
        super().__init__()
        self.gated, self.act = s.gated, _ACTIVATIONS[s.act]
        if s.gated:
            self.wi_0 = nn.Linear(s.d_model, s.d_ff, bias=False)
            self.wi_1 = nn.Linear(s.d_model, s.d_ff, bias=False)
        else:
            self.wi = nn.Linear(s.d_model, s.d_ff, bias=False)
        self.wo = nn.Linear(s.d_ff, s.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))  # [B, L, F]
        return self.wo(h.to(self.wo.weight.dtype))


class FeedForwardLayer(nn.Module):
    def __init__(self, s: T5Settings) -> None:
        super().__init__()
        self.DenseReluDense = FeedForward(s)
        self.layer_norm = RMSNorm(s.d_model, s.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


class Block(nn.Module):
    def __init__(self, s: T5Settings, has_bias: bool) -> None:
        super().__init__()
        self.layer = nn.ModuleList([AttentionLayer(s, has_bias), FeedForwardLayer(s)])

    def forward(self, x: torch.Tensor, bias: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return self.layer[1](self.layer[0](x, bias, keep))


class Stack(nn.Module):
    def __init__(self, s: T5Settings, shared: nn.Embedding) -> None:
        super().__init__()
        self.embed_tokens = shared  # the tied input embedding (one tensor, two checkpoint names)
        self.block = nn.ModuleList([Block(s, has_bias=i == 0) for i in range(s.num_layers)])
        self.final_layer_norm = RMSNorm(s.d_model, s.eps)


class T5EncoderModel(nn.Module):
    """The encoder half of T5: token ids + mask -> last hidden state [B, L, D] (dropout off)."""

    def __init__(self, s: T5Settings) -> None:
        super().__init__()
        self.shared = _embedding(s.vocab_size, s.d_model)
        self.encoder = Stack(s, self.shared)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids [B, L] int64, attention_mask [B, L] (1: real token) -> [B, L, D]."""
        x = self.shared(input_ids)
        first = self.encoder.block[0].layer[0].SelfAttention
        bias = first.position_bias(input_ids.shape[1], x.device)  # shared by every block
        keep = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, L]
        for block in self.encoder.block:
            x = block(x, bias, keep)
        return self.encoder.final_layer_norm(x)


class SentencePieceTokenizer:
    """T5's tokenizer on ``spiece.model``: the SentencePiece pieces, then ``<extra_id_0..n-1>``
    numbered downwards from the top; special tokens written in the text are single ids.

    Raises:
        ModuleNotFoundError: sentencepiece is not installed (one line saying how to get it).
        OSError / RuntimeError: spiece.model is not a SentencePiece model.
    """

    def __init__(self, spiece: Path, extra_ids: int = 100) -> None:
        try:
            import sentencepiece
        except ImportError:
            raise ModuleNotFoundError(
                "the T5 tokenizer needs the sentencepiece package: pip install sentencepiece"
            ) from None
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(spiece))
        pieces = self.sp.get_piece_size()
        self._extra = {f"<extra_id_{i}>": pieces + extra_ids - 1 - i for i in range(extra_ids)}
        self._size = pieces + extra_ids
        specials = {"</s>": EOS_ID, "<pad>": PAD_ID, "<unk>": self.sp.unk_id(), **self._extra}
        self._specials = specials
        self._split = re.compile("(" + "|".join(map(re.escape, sorted(specials, key=len, reverse=True))) + ")")

    def __len__(self) -> int:
        return self._size

    def convert_tokens_to_ids(self, tokens: Sequence[str]) -> list[int]:
        return [self._specials.get(t, self.sp.piece_to_id(t)) for t in tokens]

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        names = {v: k for k, v in self._extra.items()}
        return [names[i] if i in names else self.sp.id_to_piece(i) for i in ids]

    def ids(self, text: str) -> list[int]:
        """Token ids of one text, without the appended EOS."""
        out: list[int] = []
        for part in self._split.split(text):
            out.extend([self._specials[part]] if part in self._specials else self.sp.encode(part) if part else [])
        return out

    def __call__(self, texts: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids [n, max_length] int64, attention_mask [n, max_length] int64): EOS appended,
        truncated before it to max_length, padded with id 0."""
        rows = [self.ids(t)[: max_length - 1] + [EOS_ID] for t in texts]
        ids = torch.full((len(rows), max_length), PAD_ID, dtype=torch.long)
        mask = torch.zeros((len(rows), max_length), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        return ids, mask
