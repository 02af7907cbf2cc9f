"""The initial noise of a video, handed out one chunk at a time with bounded host memory.

The official code draws the noise of the whole video in one ``torch.randn`` call of shape
[1, C, T, H, W] (shared/spec/sampling.md §2) and chunk k takes frames [k·cw, (k+1)·cw). Keeping
that tensor in memory costs C·T·H·W·4 bytes, 16·6·90·90·4 ≈ 3.1 MB per chunk at 720×720 (5.5 MB
at 720×1280), so host memory would grow with the video length. ``InitialNoise`` keeps the same
values but, above ``spill_bytes``, holds them in an anonymous temporary file (unlinked at once,
so the disk space is returned when the file is closed or the process dies) and reads each chunk's
slice when the chunk enters the window, with plain positioned reads (no memory map: mapped pages
would count in the process's resident set).

Drawing without ever holding the whole tensor: CPU ``torch.randn`` (float32) fills its output
with one uniform per element and turns each group of 16 into normals; a length that is not a
multiple of 16 redoes its last 16 elements with 16 fresh uniforms. So consecutive draws of
multiples of 16 elements, the last one at least 16 long, consume the generator exactly as one
draw and give the same values bit for bit (``tests/sampling/test_denoise.py`` checks this over several
sizes). CUDA draws depend on the kernel's launch geometry, so on CUDA the noise is drawn in one
call (exact official values) and then moved to the file piece by piece.

``per_chunk=True`` draws each chunk's noise on its own (seed + chunk index): memory independent
of any length, but **not** the official noise (a video of the same seed differs).

Legend: C latent channels, T latent frames, H W latent size, cw chunk width (latent frames).
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from magi.budget import SPILL_BYTES

PIECE_ELEMENTS = 2**20  # CPU draw / copy granularity: 4 MiB of float32, a multiple of 16
_GROUP = 16  # CPU randn turns uniforms into normals 16 at a time


def piece_sizes(total: int, piece: int = PIECE_ELEMENTS) -> list[int]:
    """Split ``total`` elements into draws that reproduce one ``randn(total)`` on CPU.

    Every piece but the last is ``piece`` long (a multiple of 16); the last one is at least 16
    long (or the whole draw, when ``total`` < 16).
    """
    if piece % _GROUP != 0 or piece <= 0:
        raise ValueError(f"piece must be a positive multiple of {_GROUP}, got {piece}")
    sizes, left = [], total
    while left > 0:
        size = left if left < piece + _GROUP else piece
        sizes.append(size)
        left -= size
    return sizes


def randn_pieces(total: int, generator: torch.Generator, piece: int = PIECE_ELEMENTS):
    """Yield float32 CPU pieces whose concatenation equals ``torch.randn(total, generator=...)``."""
    for size in piece_sizes(total, piece):
        yield torch.randn(size, generator=generator)


class InitialNoise:
    """Chunk slices of the initial noise [1, C, T, H, W] float32, in memory or in a temp file.

    Build with ``draw`` (from a seed), ``from_tensor`` (given noise) or ``per_chunk``; call
    ``chunk(k)`` for chunk k's [1, C, cw, H, W] (float32, CPU); ``close()`` (or ``with``) frees
    the memory / file.
    """

    def __init__(self, shape: tuple[int, ...], chunk_width: int) -> None:
        if len(shape) != 5 or shape[0] != 1:
            raise ValueError(f"initial noise must be [1, C, T, H, W], got {tuple(shape)}")
        self.shape, self.chunk_width = tuple(shape), chunk_width
        self._tensor: torch.Tensor | None = None  # in-memory noise (small videos)
        self._file = None  # temp file holding the flat float32 values (large videos)
        self._seed: int | None = None  # per-chunk draws
        self._directory: str | None = None  # folder of the temp file (None: the system default)

    # ---- constructors --------------------------------------------------------------------------
    @classmethod
    def draw(
        cls,
        shape: tuple[int, ...],
        seed: int,
        chunk_width: int,
        *,
        device: torch.device | str = "cpu",
        spill_bytes: int = SPILL_BYTES,
        directory: str | Path | None = None,
    ) -> InitialNoise:
        """The official draw ``randn(shape)`` from a generator on ``device`` seeded with ``seed``.

        Args:
            shape: [1, C, T, H, W].
            seed: generator seed.
            chunk_width: cw, latent frames per chunk.
            device: where the generator lives (CUDA noise differs from CPU noise).
            spill_bytes: above this size the values go to a temporary file.
            directory: folder of the temporary file (default: the system temp folder).
        """
        noise = cls(shape, chunk_width)
        device = torch.device(device)
        generator = torch.Generator(device).manual_seed(seed)
        if math.prod(shape) * 4 <= spill_bytes:
            noise._tensor = torch.randn(shape, generator=generator, device=device).cpu()
            return noise
        noise._open(directory)
        if device.type == "cpu":  # piecewise draw == one draw (module docstring)
            noise._write(randn_pieces(math.prod(shape), generator))
        else:
            whole = torch.randn(shape, generator=generator, device=device).view(-1)
            noise._write(whole[i : i + PIECE_ELEMENTS].cpu() for i in range(0, whole.numel(), PIECE_ELEMENTS))
        return noise

    @classmethod
    def from_tensor(cls, tensor: torch.Tensor, chunk_width: int) -> InitialNoise:
        """Given noise (kept by reference; slices are copied to float32 when read)."""
        noise = cls(tuple(tensor.shape), chunk_width)
        noise._tensor = tensor
        return noise

    @classmethod
    def per_chunk(cls, shape: tuple[int, ...], seed: int, chunk_width: int) -> InitialNoise:
        """Each chunk drawn alone on CPU with seed ``seed + k``: NOT the official noise.

        Memory never depends on the length; ``shape[2]`` only bounds the chunk index.
        """
        noise = cls(shape, chunk_width)
        noise._seed = seed
        return noise

    # ---- reading -------------------------------------------------------------------------------
    @property
    def spilled(self) -> bool:
        """Whether the values live in a temporary file."""
        return self._file is not None

    def chunk(self, k: int) -> torch.Tensor:
        """Chunk k's noise [1, C, cw, H, W], float32 on CPU (a fresh tensor)."""
        _, c, t, h, w = self.shape
        cw = self.chunk_width
        if not 0 <= k < t // cw:
            raise ValueError(f"chunk {k} is outside the noise's {t // cw} chunks")
        if self._seed is not None:
            generator = torch.Generator().manual_seed(self._seed + k)
            return torch.randn((1, c, cw, h, w), generator=generator)
        if self._tensor is not None:
            return self._tensor[:, :, k * cw : (k + 1) * cw].to("cpu", torch.float32, copy=True)
        if self._file is None:
            raise ValueError("the initial noise was closed; draw it again")
        return self._read(k)

    def close(self) -> None:
        """Free the values (closing the temp file returns its disk space)."""
        self._tensor = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> InitialNoise:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the temp file ---------------------------------------------------------------------------
    def _open(self, directory: str | Path | None) -> None:
        # TemporaryFile is unlinked on creation (O_TMPFILE on Linux): nothing is left behind even
        # when the process is killed.
        self._directory = None if directory is None else str(directory)
        self._file = tempfile.TemporaryFile(prefix="magi-noise-", dir=directory)

    def _write(self, pieces) -> None:
        try:
            for piece in pieces:
                self._file.write(piece.numpy().data)  # the tensor's own buffer, no copy
            self._file.flush()
        except OSError as err:
            self.close()
            folder = self._directory or tempfile.gettempdir()
            need = math.prod(self.shape) * 4 / 2**30
            raise OSError(
                f"cannot write the initial noise file ({need:.2f} GiB) in {folder}: "
                f"{err.strerror or type(err).__name__}; free space there or point TMPDIR at a "
                "larger disk (or pass per_chunk_noise=True)"
            ) from None
        except BaseException:
            self.close()
            raise

    def _read(self, k: int) -> torch.Tensor:
        """Chunk k is C runs of cw·H·W contiguous values (the file is in [C, T, H, W] order)."""
        _, c, t, h, w = self.shape
        run = self.chunk_width * h * w
        out = np.empty((c, run), dtype=np.float32)
        fd = self._file.fileno()
        for ci in range(c):
            offset = (ci * t * h * w + k * run) * 4
            got = os.preadv(fd, [memoryview(out[ci]).cast("B")], offset)  # straight into out
            if got != run * 4:
                raise OSError(f"noise file is short: chunk {k} channel {ci} read {got} bytes")
        return torch.from_numpy(out).view(1, c, self.chunk_width, h, w)


class JoinedNoise:
    """The noise of a video made longer on resume (``magi.prepare.resumed_noise``): consecutive
    draws, part i covering the chunks from ``parts[i][0]`` on; ``chunk(k)`` reads the part that
    holds absolute chunk k. Closing it closes every part."""

    def __init__(self, parts: list[tuple[int, InitialNoise]]) -> None:
        if not parts or parts[0][0] != 0 or any(a[0] >= b[0] for a, b in zip(parts, parts[1:])):
            raise ValueError(f"noise parts must start at chunk 0 and increase, got {[p[0] for p in parts]}")
        self.parts = parts

    def chunk(self, k: int) -> torch.Tensor:
        """Chunk k's noise [1, C, cw, H, W], float32 on CPU."""
        first, noise = next(part for part in reversed(self.parts) if part[0] <= k)
        return noise.chunk(k - first)

    def close(self) -> None:
        for _, noise in self.parts:
            noise.close()

    def __enter__(self) -> JoinedNoise:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
