"""The old home of magi.media, kept one round so existing imports work: import from
magi.media.read (reading, v2v prefix), magi.media.latents (VAE encode/decode), magi.media.mp4."""

from magi.budget import OFFICIAL_PREFIX_FRAMES, TEMPORAL_FACTOR, visible_prefix_frames
from magi.media.latents import SCALE_FACTOR, decode_to_uint8, encode_prefix
from magi.media.mp4 import Mp4Writer, VideoWriteError
from magi.media.read import (
    MAX_IMAGE_PIXELS,
    MIN_SOURCE_SIDE,
    MediaInfo,
    Size,
    load_image,
    load_prefix_video,
    load_video,
    probe,
    resize_filter,
    select_prefix_frames,
)
from magi.request import COMPAT_MODES

__all__ = [
    "COMPAT_MODES",
    "MAX_IMAGE_PIXELS",
    "MIN_SOURCE_SIDE",
    "OFFICIAL_PREFIX_FRAMES",
    "SCALE_FACTOR",
    "TEMPORAL_FACTOR",
    "MediaInfo",
    "Mp4Writer",
    "Size",
    "VideoWriteError",
    "decode_to_uint8",
    "encode_prefix",
    "load_image",
    "load_prefix_video",
    "load_video",
    "probe",
    "resize_filter",
    "select_prefix_frames",
    "visible_prefix_frames",
]
