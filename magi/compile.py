"""Optional regional ``torch.compile`` of the DiT: each transformer layer's forward, off by default.

Regional compilation (one compiled region per repeated layer) gets most of the benefit of
compiling the whole model (fused norms, gating, RoPE and residual elementwise work around the big
GEMMs) at a fraction of the compile time, and the layers' code is shared so the compiled graph is
reused across layers. Only ``forward`` is replaced, so module hooks (``magi.offload`` block
streaming) keep running eagerly around it and parameter names / state-dict keys are unchanged.

The layers trace without graph breaks (the DiT hands attention its ranges as host ints), but the
KV-cache reads and writes index a Python dict by absolute chunk, which would make every window a
new graph (and hit dynamo's recompile limit after 8 windows). ``compile_blocks`` therefore leaves
the cache I/O of each ``SelfAttentionCore`` eager (``torch.compiler.disable``): a cached call breaks
the graph there, while the attention itself, whose ranges are relative to the history and repeat
from window to window, stays compiled. To trace one whole window into a single graph (e.g. for
CUDA graphs), compile the model itself with ``fullgraph=True`` and the host arguments of
``magi.models.dit.host_call_args``; that graph is specialised to the window (tests/test_compile.py).

CUDA graphs (``mode="reduce-overhead"``) are not recommended: every sampler step changes the
token count (window growing / shrinking, the extra clean chunk, the nearly-clean copy), block
streaming changes weight addresses every pass, and at 720p each layer's kernels run for
milliseconds, so launch overhead is not what limits a step. See docs/PERFORMANCE.md.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from magi.models.dit import SelfAttentionCore


def compile_blocks(model: nn.Module, **compile_kwargs: Any) -> nn.Module:
    """Replace every ``model.videodit_blocks.layers[i].forward`` by a compiled version, in place.

    Args:
        model: a built DiT.
        **compile_kwargs: passed to ``torch.compile`` (e.g. ``backend="eager"`` to check the
            tracing alone, ``mode="max-autotune-no-cudagraphs"``, ``dynamic=True``).

    Returns:
        the same model.
    """
    for layer in model.videodit_blocks.layers:
        if is_compiled(layer):
            continue
        for core in _cache_cores(layer):
            # Instance attributes shadow the class's methods (undone by uncompile_blocks).
            core.cache_history = torch.compiler.disable(core.cache_history)
            core.cache_write = torch.compiler.disable(core.cache_write)
        # An instance attribute shadows the class's forward; nn.Module.__call__ looks it up.
        layer.forward = torch.compile(layer.forward, **compile_kwargs)
    return model


def uncompile_blocks(model: nn.Module) -> nn.Module:
    """Undo ``compile_blocks`` (back to the eager forward of every layer)."""
    for layer in model.videodit_blocks.layers:
        if is_compiled(layer):
            del layer.forward
            for core in _cache_cores(layer):
                del core.cache_history, core.cache_write
    return model


def _cache_cores(layer: nn.Module) -> list[SelfAttentionCore]:
    return [m for m in layer.modules() if isinstance(m, SelfAttentionCore)]


def is_compiled(layer: nn.Module) -> bool:
    """Whether ``compile_blocks`` replaced this layer's forward."""
    return "forward" in vars(layer)
