"""The frames a call returns, in the form asked for, and writing frames to an mp4.

``output_type`` (``MagiPipeline.__call__`` / ``generate``):

* ``"np"``: a uint8 numpy array (T, H, W, 3), the notebook default.
* ``"pil"``: a list of T RGB ``PIL.Image`` images.
* ``"pt"``: a uint8 torch tensor (T, 3, H, W), as ``VideoChunk.frames``.
* ``"latent"``: the clean latents of the generated chunks, float32 [1, C, T_latent, H/8, W/8].
* ``None``: keep no frames (``generate``'s default: memory stays bounded by a chunk).

``export_to_video(frames, path, fps)`` writes any of the pixel forms to an mp4.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

OUTPUT_TYPES = ("np", "pil", "pt", "latent")


def check_output_type(output_type: str | None) -> str | None:
    """``output_type`` itself when it is one of OUTPUT_TYPES or None; else a one-line ValueError."""
    if output_type is not None and output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)} or None, got {output_type!r}"[:200])
    return output_type


def convert_frames(frames: torch.Tensor, output_type: str) -> np.ndarray | list | torch.Tensor:
    """uint8 frames [T, 3, H, W] in the form ``output_type`` names ("np", "pil" or "pt")."""
    if output_type == "pt":
        return frames
    array = frames.permute(0, 2, 3, 1).contiguous().numpy()  # [T, H, W, 3]
    if output_type == "np":
        return array
    if output_type == "pil":
        from PIL import Image

        return [Image.fromarray(frame) for frame in array]
    raise ValueError(f"convert_frames converts to np, pil or pt, got {output_type!r}")


def _as_tchw_uint8(frames: object) -> torch.Tensor:
    """Any pixel form (np (T,H,W,3), list of PIL images / arrays, tensor (T,3,H,W)) as uint8 [T, 3, H, W].

    Floating-point frames are taken as values in [0, 1] (diffusers' convention) and rounded.
    """
    if isinstance(frames, (list, tuple)):
        if not frames:
            raise ValueError("export_to_video got no frames; pass at least one")
        frames = np.stack([np.asarray(f) for f in frames])  # PIL images -> (H, W, 3) arrays
    if isinstance(frames, np.ndarray):
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"export_to_video expects frames (T, H, W, 3), got an array of shape {frames.shape}")
        frames = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
    if not isinstance(frames, torch.Tensor):
        raise TypeError(f"export_to_video expects an array, a tensor or a list of images, got {type(frames).__name__}")
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"export_to_video expects a tensor (T, 3, H, W), got shape {tuple(frames.shape)}")
    if frames.is_floating_point():
        frames = (frames.float().clamp(0, 1) * 255).round()
    return frames.to(torch.uint8).cpu()


def export_to_video(frames: object, path: str | Path, fps: float = 24) -> Path:
    """Write frames to an mp4 (libx264, yuv420p, as ``generate`` writes); returns the path.

    Args:
        frames: a uint8 array (T, H, W, 3) (``output_type="np"``), a list of PIL images
            (``"pil"``) or a uint8 tensor (T, 3, H, W) (``"pt"``); float values are read as [0, 1].
        path: the .mp4 file (its folder must exist; replaced when it exists).
        fps: the frame rate (the pipeline's is ``pipe.config.runtime.fps``).
    """
    from magi.media.mp4 import Mp4Writer

    tchw = _as_tchw_uint8(frames)
    with Mp4Writer(path, fps) as writer:
        writer.append(tchw)
    return Path(path)
