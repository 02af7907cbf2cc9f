"""Fixtures of the generation tests (tests/run)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Per mode, the generate() inputs of a seeded 64x64 start image and a 40-frame prefix video."""
    from magi.video_io import Mp4Writer

    root = tmp_path_factory.mktemp("media")
    image = root / "start.ppm"
    g = torch.Generator().manual_seed(3)
    rgb = torch.randint(0, 256, (64, 64, 3), dtype=torch.uint8, generator=g)
    image.write_bytes(b"P6 64 64 255\n" + rgb.numpy().tobytes())
    video = root / "prefix.mp4"
    with Mp4Writer(video, 24) as w:
        w.append(torch.randint(0, 256, (40, 3, 64, 64), dtype=torch.uint8, generator=g))
    return {"i2v": {"image_path": image}, "v2v": {"prefix_video_path": video}, "t2v": {}}
