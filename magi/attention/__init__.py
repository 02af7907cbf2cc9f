"""The one attention entry point every magi model calls.

``attention(q, k, v, q_ranges, k_ranges)`` runs range-masked attention: query segment i
(tokens [q0, q1)) attends, with no mask inside, to the keys [k0, k1). Self-attention
(block-causal over chunks) and cross-attention (each chunk to its own caption tokens) are both
expressed as such ranges (built by :mod:`magi.attention.masks`), so the math never depends on the
backend. Backends are modules exposing a function ``attention(q, k, v, q_ranges, k_ranges)`` with
this contract; they are imported lazily by name, so optional ones (which need extra packages or a
GPU) cost nothing until chosen. The default, "sdpa", is imported with this package, and the others
when chosen (``set_backend`` / ``check_backend``): an import inside a ``torch.compile``d forward
would break its graph.

Ranges are an int tensor [S, 2] or Python int pairs (``magi.attention.masks.Pairs``); with
pairs the call reads nothing back from the device, so it traces into one ``torch.compile`` graph.

``"auto"`` is a name too: it picks, per call, from the query's device and dtype (flash-attn on CUDA
for bf16 / fp16 when installed, else FlexAttention on CUDA, else SDPA), so one model can run its
CPU tests and its GPU runs under the same setting. ``check_backend`` says before any model is
loaded whether a choice can run on a device and dtype (one-line ``ValueError`` when not).

Legend: L tokens, N query heads, G K/V heads, D head dim, S segments.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType

import torch

from magi.attention.masks import Ranges

__all__ = [
    "AUTO",
    "BACKENDS",
    "BACKEND_CHOICES",
    "attention",
    "check_backend",
    "get_backend",
    "resolve_backend",
    "set_backend",
]

# name -> module implementing ``attention(q, k, v, q_ranges, k_ranges)``
BACKENDS: dict[str, str] = {
    "sdpa": "magi.attention.sdpa",
    "flex": "magi.attention.flex",
    "flash": "magi.attention.flash",
}

AUTO = "auto"  # resolved per call by ``resolve_backend`` (never a module of its own)
BACKEND_CHOICES: tuple[str, ...] = (AUTO, *BACKENDS)

_default_backend = "sdpa"
_loaded: dict[str, ModuleType] = {}
_auto_choice: dict[tuple[str, torch.dtype], str] = {}  # (device type, dtype) -> resolved name


def set_backend(name: str) -> None:
    """Choose the backend used when ``attention`` is called without ``backend=``.

    Args:
        name: one of ``BACKEND_CHOICES`` ("auto", "sdpa", "flex", "flash"). A concrete backend is
            imported now, so a missing optional package fails here with one line rather than
            mid-generation; "auto" resolves on each call (see ``resolve_backend``). Use
            ``check_backend`` to also check the device and dtype.
    """
    global _default_backend
    if name != AUTO:
        _backend_fn(name)
    _default_backend = name


def resolve_backend(name: str, device: torch.device | str, dtype: torch.dtype) -> str:
    """The concrete backend ``name`` stands for on ``device`` with ``dtype`` inputs.

    "auto": "flash" on CUDA for bf16 / fp16 when flash-attn is installed, else "flex" on CUDA,
    else "sdpa". Any other name is returned as it is (after checking it is known).

    Args:
        name: one of ``BACKEND_CHOICES``.
        device: where q / k / v live.
        dtype: their dtype.
    """
    if name != AUTO:
        if name not in BACKENDS:
            raise ValueError(f"unknown attention backend {name!r}; choose one of {list(BACKEND_CHOICES)}")
        return name
    device = torch.device(device)
    if device.type != "cuda":
        return "sdpa"
    from magi.attention import flash

    return "flash" if dtype in (torch.float16, torch.bfloat16) and flash.is_available() else "flex"


def check_backend(name: str, device: torch.device | str, dtype: torch.dtype) -> str:
    """Check that backend ``name`` can run on ``device`` with ``dtype``; return the concrete name.

    Meant to run before any model is loaded, so a bad choice costs nothing.

    Args:
        name: one of ``BACKEND_CHOICES``.
        device: the compute device of the model.
        dtype: the dtype attention runs in (the model's params dtype).

    Raises:
        ValueError: one line naming the problem and the alternative.
    """
    chosen = resolve_backend(name, device, dtype)
    device = torch.device(device)
    try:
        _backend_fn(chosen)
    except ImportError as err:
        raise ValueError(str(err)) from None
    if chosen == "flash":
        from magi.attention import flash

        if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(
                f"attention backend 'flash' runs bf16/fp16 on CUDA, not {dtype} on {device.type}; "
                "choose 'auto', 'flex' or 'sdpa'"
            )
        if not flash.is_available():
            raise ValueError(
                "attention backend 'flash' needs the flash-attn package (pip install flash-attn "
                "--no-build-isolation); choose 'auto', 'flex' or 'sdpa'"
            )
    return chosen


def get_backend() -> str:
    """Name of the backend used by default."""
    return _default_backend


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_ranges: Ranges,
    k_ranges: Ranges,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Range-masked multi-head attention with GQA.

    Args:
        q: [Lq, N, D] queries.
        k: [Lk, G, D] keys; N % G == 0, query head h reads K/V head h // (N // G).
        v: [Lk, G, D] values.
        q_ranges: [S, 2] int tensor or S int pairs; disjoint query segments covering [0, Lq).
        k_ranges: same form; segment i attends fully to keys [k0, k1) (an empty range gives 0).
        backend: backend name for this call ("auto" picks from q's device and dtype); None
            uses ``get_backend()``.

    Returns:
        [Lq, N, D] in q's dtype, softmax scale 1/sqrt(D).
    """
    _check_shapes(q, k, v, q_ranges, k_ranges)
    name = backend or _default_backend
    if name == AUTO:
        name = _auto_for(q)
    return _backend_fn(name)(q, k, v, q_ranges, k_ranges)


def _auto_for(q: torch.Tensor) -> str:
    # Resolved once per (device type, dtype): the flash-attn import probe is not free.
    key = (q.device.type, q.dtype)
    if key not in _auto_choice:
        _auto_choice[key] = resolve_backend(AUTO, q.device, q.dtype)
    return _auto_choice[key]


def _backend_fn(name: str) -> Callable[..., torch.Tensor]:
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {list(BACKEND_CHOICES)}")
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(BACKENDS[name])
        except ModuleNotFoundError as err:
            raise ImportError(
                f"attention backend {name!r} is unavailable ({err}); use backend 'sdpa' or install the package it needs"
            ) from None
    return _loaded[name].attention


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_ranges: Ranges, k_ranges: Ranges) -> None:
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
    q_shape, k_shape = _ranges_shape(q_ranges), _ranges_shape(k_ranges)
    if q_shape != k_shape or len(q_shape) != 2 or q_shape[-1] != 2:
        raise ValueError(f"attention: q_ranges and k_ranges must both be [S, 2], got {q_shape} and {k_shape}")


def _ranges_shape(ranges: Ranges) -> tuple[int, ...]:
    if isinstance(ranges, torch.Tensor):
        return tuple(ranges.shape)
    widths = {len(r) for r in ranges}
    return (len(ranges), *widths) if len(widths) <= 1 else (len(ranges), -1)


_backend_fn(_default_backend)  # plain PyTorch, always importable; see the module docstring
