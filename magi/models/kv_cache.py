"""Bounded KV cache of clean chunks for the autoregressive DiT.

Each layer keeps, per absolute chunk index, the rows [c, G_local, 2*D] = [K after k-norm and
RoPE | V] that the chunk contributed to self-attention (the layout of the official
``key_value_memory_dict``; shared/spec/dit.md §8). Only the newest ``max_chunks`` chunks are kept,
so memory stays constant however long the video: later chunks only ever look a few chunks back
(kv range [5, 4, 3, 2] in the shipped configs, i.e. at most 4 earlier chunks).

Key coordinates stay absolute (row r belongs to chunk r // c); ``read`` returns the rows of a
chunk interval and the caller translates its key ranges by ``first_chunk * c``. Reading a chunk
that was evicted or never written raises, naming the chunk, instead of attending to garbage.

With ``offload=True`` the rows live in CPU memory (pinned when CUDA is available) and each read
copies only the needed chunks to the compute device, one layer at a time.

Legend: c tokens per chunk, G K/V heads held by this process, D head dim.
"""

from __future__ import annotations

import torch


class KVCache:
    """Per-layer K/V rows of the newest ``max_chunks`` chunks, keyed by absolute chunk index.

    Args:
        max_chunks: how many chunks to keep (the oldest are evicted on write).
        offload: keep the rows in CPU memory and copy them to the compute device on read.
    """

    def __init__(self, max_chunks: int, offload: bool = False) -> None:
        if max_chunks < 1:
            raise ValueError(f"KVCache needs max_chunks >= 1, got {max_chunks}")
        self.max_chunks = max_chunks
        self.offload = offload
        self._layers: dict[int, dict[int, torch.Tensor]] = {}

    def write(self, layer: int, first_chunk: int, kv: torch.Tensor, chunk_tokens: int) -> None:
        """Store the rows of chunks first_chunk, first_chunk + 1, ... for one layer.

        Args:
            layer: layer index (local to this model / pipeline stage).
            first_chunk: absolute chunk index of the first row block.
            kv: [n*c, G, 2*D] rows, n whole chunks.
            chunk_tokens: c.
        """
        if kv.shape[0] % chunk_tokens != 0:
            raise ValueError(f"KV rows {kv.shape[0]} are not a whole number of {chunk_tokens}-token chunks")
        store = self._layers.setdefault(layer, {})
        for i, rows in enumerate(kv.split(chunk_tokens, dim=0)):
            store[first_chunk + i] = self._to_storage(rows)
        for old in sorted(store)[: max(0, len(store) - self.max_chunks)]:
            del store[old]

    def read(self, layer: int, first_chunk: int, end_chunk: int, device: torch.device) -> torch.Tensor:
        """Rows of chunks [first_chunk, end_chunk) on ``device``: [(end-first)*c, G, 2*D]."""
        store = self._layers.get(layer, {})
        missing = [i for i in range(first_chunk, end_chunk) if i not in store]
        if missing:
            held = f"chunks {min(store)}..{max(store)}" if store else "nothing"
            raise ValueError(
                f"KV cache layer {layer} has no rows for chunk(s) {missing} (it holds {held}, "
                f"max_chunks={self.max_chunks}); the kv_range reaches further back than the cache "
                "keeps: raise max_chunks or write those chunks first"
            )
        rows = [store[i] for i in range(first_chunk, end_chunk)]
        return torch.cat(rows, dim=0).to(device, non_blocking=True)

    def chunks(self, layer: int) -> list[int]:
        """Absolute indices of the chunks held for ``layer``, ascending."""
        return sorted(self._layers.get(layer, {}))

    def clear(self) -> None:
        """Drop every row (start of a new video)."""
        self._layers.clear()

    def _to_storage(self, rows: torch.Tensor) -> torch.Tensor:
        if not self.offload:
            return rows.detach().clone()
        host = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=torch.cuda.is_available())
        host.copy_(rows.detach())
        return host
