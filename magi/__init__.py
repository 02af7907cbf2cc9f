"""magi: inference library for MAGI-1, Sand AI's autoregressive video diffusion model."""

from magi.config import ConfigError, MagiConfig, check_paths, load_config
from magi.version import __version__

__all__ = ["ConfigError", "MagiConfig", "MagiPipeline", "__version__", "check_paths", "export_to_video", "load_config"]


def __getattr__(name: str):
    # The pipeline pulls in torch and the models; import it only when asked for.
    if name == "MagiPipeline":
        from magi.pipeline import MagiPipeline

        return MagiPipeline
    if name == "export_to_video":
        from magi.output import export_to_video

        return export_to_video
    raise AttributeError(f"module 'magi' has no attribute {name!r}")
