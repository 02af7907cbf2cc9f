"""DiT block streaming: keep the transformer layers in host memory, bring each in just in time.

Applied from outside to a built model (the model file knows nothing about it):
``offload_blocks(model, device)`` moves everything except ``model.videodit_blocks.layers`` to
``device`` and the layers' weights to host memory (pinned when CUDA is available, so copies are
asynchronous). Forward hooks on every layer then

* before layer i runs: make its weights resident (waiting for the prefetch if one is in flight)
  and start copying layer i + 1 on a side CUDA stream, so the copy overlaps layer i's compute;
* after layer i ran: point its parameters back at the host copies, freeing the device memory.

At most two layers are on the device at once. The weights are the same tensors either way, so
the offloaded forward is bit-identical to the plain one. On a CPU device every copy is a no-op
and the hooks only do the bookkeeping (which is what the CPU test checks).

The cost is one host-to-device copy of the stack per DiT pass: 24B bf16 is ~48 GB, i.e. ~2 s per
pass at ~25 GB/s PCIe 4 x16 (computed, not measured), so it pays off only where the model does not
otherwise fit; see docs/PERFORMANCE.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class BlockOffloader:
    """Streams a list of modules (DiT layers) between host memory and ``device``.

    Args:
        layers: modules run one after the other in this order.
        device: compute device the layers run on.
        pin_memory: keep host copies in page-locked memory (default: when CUDA is available).
        prefetch: copy layer i + 1 on a side stream while layer i runs (CUDA only).
    """

    def __init__(
        self,
        layers: list[nn.Module],
        device: torch.device | str,
        *,
        pin_memory: bool | None = None,
        prefetch: bool = True,
    ) -> None:
        self.layers = layers
        self.device = torch.device(device)
        pin = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.loads = 0  # layer loads since creation (prefetched ones included)
        self._host = [_to_host(layer, pin) for layer in layers]
        self._stream = torch.cuda.Stream(self.device) if prefetch and self.device.type == "cuda" else None
        self._pending: dict[int, tuple[list[torch.Tensor], torch.cuda.Event]] = {}
        self._resident: set[int] = set()  # layers whose weights are device copies right now
        self._handles = []
        for index, layer in enumerate(layers):
            self._handles.append(layer.register_forward_pre_hook(self._pre_hook(index)))
            self._handles.append(layer.register_forward_hook(self._post_hook(index)))

    def remove(self, resident: bool = True) -> None:
        """Remove the hooks; with ``resident`` put every layer's weights on the device for good."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._drain()
        if resident:
            for index in range(len(self.layers)):
                self._assign(index, [t.to(self.device) for t in self._host[index]])
        self._resident.clear()

    def resident_layers(self) -> list[int]:
        """Layers whose weights are device copies right now, prefetched ones included."""
        return sorted(self._resident | set(self._pending))

    # ---- hooks -------------------------------------------------------------------------------
    def _pre_hook(self, index: int):
        def hook(module: nn.Module, args: tuple) -> None:
            self._load(index)
            if self._stream is not None:
                self._prefetch((index + 1) % len(self.layers))

        return hook

    def _post_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            self._assign(index, self._host[index])
            self._resident.discard(index)

        return hook

    # ---- copies ------------------------------------------------------------------------------
    def _load(self, index: int) -> None:
        if index in self._pending:
            tensors, ready = self._pending.pop(index)
            current = torch.cuda.current_stream(self.device)
            current.wait_event(ready)
            for t in tensors:
                # allocated on the side stream, used on this one: keep the allocator from
                # handing the memory out again before this stream is done with it
                t.record_stream(current)
        else:
            tensors = [t.to(self.device, non_blocking=True) for t in self._host[index]]
            self.loads += 1
        self._assign(index, tensors)
        self._resident.add(index)

    def _prefetch(self, index: int) -> None:
        if index in self._pending or index in self._resident:
            return
        with torch.cuda.stream(self._stream):
            tensors = [t.to(self.device, non_blocking=True) for t in self._host[index]]
            ready = torch.cuda.Event()
            ready.record(self._stream)
        self._pending[index] = (tensors, ready)
        self.loads += 1

    def _drain(self) -> None:
        """Wait for and drop in-flight prefetches."""
        for _tensors, ready in self._pending.values():
            ready.synchronize()
        self._pending.clear()

    def _assign(self, index: int, tensors: list[torch.Tensor]) -> None:
        for slot, t in zip(_tensor_slots(self.layers[index]), tensors, strict=True):
            slot.data = t


def offload_blocks(
    model: nn.Module,
    device: torch.device | str,
    *,
    pin_memory: bool | None = None,
    prefetch: bool = True,
) -> BlockOffloader:
    """Keep ``model.videodit_blocks.layers`` in host memory and stream them to ``device``.

    Everything else (embedders, final norm / linear, RoPE) is moved to ``device``. Build or load
    the model on the CPU (or meta + CPU load) first so the whole stack never sits on the device.

    Args:
        model: a built DiT (any device).
        device: where the forward runs.
        pin_memory: page-locked host copies (default: when CUDA is available).
        prefetch: overlap the next layer's copy with the current layer's compute (CUDA).

    Returns:
        the ``BlockOffloader``; ``.remove()`` undoes the streaming.
    """
    layers = list(model.videodit_blocks.layers)
    layer_ids = {id(t) for layer in layers for t in _tensor_slots(layer)}
    for module in model.modules():
        for _name, param in module.named_parameters(recurse=False):
            if id(param) not in layer_ids:
                param.data = param.data.to(device)
        for name, buf in module.named_buffers(recurse=False):
            if id(buf) not in layer_ids:
                module._buffers[name] = buf.to(device)
    return BlockOffloader(layers, device, pin_memory=pin_memory, prefetch=prefetch)


class HostResident:
    """Keep a whole module's weights in host memory; ``with on_device():`` brings them in.

    For a module used now and then (the VAE: one encode per request, one decode per chunk), so its
    device memory is held only while it works. Leaving the block just points the parameters back at
    the host copies (no device-to-host copy). On a CPU device nothing moves.

    Args:
        module: the module (any device; its tensors are moved to host memory now).
        device: where it runs inside ``on_device``.
        pin_memory: page-locked host copies (default: when CUDA is available).
    """

    def __init__(self, module: nn.Module, device: torch.device | str, *, pin_memory: bool | None = None) -> None:
        self.module, self.device = module, torch.device(device)
        pin = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._host = _to_host(module, pin)
        self.loads = 0  # times the weights were copied in

    @contextmanager
    def on_device(self) -> Iterator[nn.Module]:
        """The module with its weights on the device, for the duration of the block."""
        tensors = [t.to(self.device, non_blocking=True) for t in self._host]
        self.loads += 1
        for slot, t in zip(_tensor_slots(self.module), tensors, strict=True):
            slot.data = t
        try:
            yield self.module
        finally:
            for slot, t in zip(_tensor_slots(self.module), self._host, strict=True):
                slot.data = t


def _tensor_slots(module: nn.Module) -> Iterator[torch.Tensor]:
    """Parameters and buffers of a module in a fixed order (the streamed tensors)."""
    yield from module.parameters()
    yield from module.buffers()


def _to_host(layer: nn.Module, pin: bool) -> list[torch.Tensor]:
    """Move the layer's tensors to (pinned) host memory; return the host copies in slot order."""
    host = []
    for slot in _tensor_slots(layer):
        t = slot.data.to("cpu")
        if pin:
            t = t.pin_memory()
        slot.data = t
        host.append(t)
    return host
