"""The one attention entry point every magi model calls.

``attention(q, k, v, q_ranges, k_ranges)`` runs range-masked attention: query segment i
(tokens [q0, q1)) attends, with no mask inside, to the keys [k0, k1). Self-attention
(block-causal over chunks) and cross-attention (each chunk to its own caption tokens) are both
expressed as such ranges (built by :mod:`magi.attention.masks`), so the math never depends on the
backend. Backends are modules exposing a function ``attention(q, k, v, q_ranges, k_ranges)`` with
this contract; they are imported lazily by name, so optional ones (which need extra packages or a
GPU) cost nothing until chosen.

Legend: L tokens, N query heads, G K/V heads, D head dim, S segments.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType

import torch

__all__ = ["BACKENDS", "attention", "get_backend", "set_backend"]

# name -> module implementing ``attention(q, k, v, q_ranges, k_ranges)``
BACKENDS: dict[str, str] = {
    "sdpa": "magi.attention.sdpa",
    "flex": "magi.attention.flex",
    "flash": "magi.attention.flash",
}

_default_backend = "sdpa"
_loaded: dict[str, ModuleType] = {}


def set_backend(name: str) -> None:
    """Choose the backend used when ``attention`` is called without ``backend=``.

    Args:
        name: one of ``BACKENDS`` ("sdpa", "flex", "flash"). The backend is imported now, so
            a missing optional package fails here with one line rather than mid-generation.
    """
    global _default_backend
    _backend_fn(name)
    _default_backend = name


def get_backend() -> str:
    """Name of the backend used by default."""
    return _default_backend


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_ranges: torch.Tensor,
    k_ranges: torch.Tensor,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Range-masked multi-head attention with GQA.

    Args:
        q: [Lq, N, D] queries.
        k: [Lk, G, D] keys; N % G == 0, query head h reads K/V head h // (N // G).
        v: [Lk, G, D] values.
        q_ranges: [S, 2] int; disjoint query segments covering [0, Lq).
        k_ranges: [S, 2] int; segment i attends fully to keys [k0, k1) (an empty range gives 0).
        backend: backend name for this call; None uses ``get_backend()``.

    Returns:
        [Lq, N, D] in q's dtype, softmax scale 1/sqrt(D).
    """
    _check_shapes(q, k, v, q_ranges, k_ranges)
    return _backend_fn(backend or _default_backend)(q, k, v, q_ranges, k_ranges)


def _backend_fn(name: str) -> Callable[..., torch.Tensor]:
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {sorted(BACKENDS)}")
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(BACKENDS[name])
        except ModuleNotFoundError as err:
            raise ImportError(
                f"attention backend {name!r} is unavailable ({err}); use backend 'sdpa' "
                "or install the package it needs"
            ) from None
    return _loaded[name].attention


def _check_shapes(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_ranges: torch.Tensor, k_ranges: torch.Tensor
) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape:
        raise ValueError(
            f"attention expects q [L, N, D] and k = v [L, G, D], got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.shape[-1] != k.shape[-1] or q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"attention: head dims {q.shape[-1]} vs {k.shape[-1]} must match and query heads "
            f"{q.shape[1]} must be a multiple of K/V heads {k.shape[1]}"
        )
    if q_ranges.shape != k_ranges.shape or q_ranges.dim() != 2 or q_ranges.shape[-1] != 2:
        raise ValueError(
            f"attention: q_ranges and k_ranges must both be [S, 2], got {tuple(q_ranges.shape)} "
            f"and {tuple(k_ranges.shape)}"
        )
