"""Where ``MagiPipeline.from_pretrained`` finds a checkpoint: a local folder or a Hub repo (cached).

A folder is read as ``magi.download`` lays it out: ``<dir>/<variant>_config.json`` (used as is),
or the ``ckpt/...`` weights without a config (the config is written, as a rerun of
``python -m magi.download`` would). A Hub repo id (``sand-ai/MAGI-1``) is downloaded once into the
user cache (``cache_root()``); a later call finds the written config there and does not go online.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from magi.config import PRESET_NAMES
from magi.download import REPO_ID, download, write_config

DEFAULT_VARIANT = "4.5B_distill"
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def cache_root() -> Path:
    """magi's cache folder: $MAGI_CACHE, else $XDG_CACHE_HOME/magi, else ~/.cache/magi."""
    if os.environ.get("MAGI_CACHE"):
        return Path(os.environ["MAGI_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "magi"


def _check_variant(variant: str) -> None:
    if variant not in PRESET_NAMES:
        raise ValueError(f"variant {variant!r} is not an official checkpoint; choose one of {', '.join(PRESET_NAMES)}")


def from_folder(folder: Path, variant: str) -> Path:
    """The config of ``variant`` in a local folder (written from the preset when only ckpt/ is there)."""
    config = folder / f"{variant}_config.json"
    if config.is_file():
        return config
    if (folder / "ckpt").is_dir():
        _check_variant(variant)
        return write_config(variant, folder)
    raise FileNotFoundError(
        f"{folder} holds neither {variant}_config.json nor a ckpt/ folder; get it with "
        f"`python -m magi.download {variant} --dir {folder}`"[:200]
    )


def resolve_pretrained(
    repo_or_dir: str | Path, variant: str = DEFAULT_VARIANT, cache_dir: str | Path | None = None
) -> Path:
    """The official-format config file for a folder, a config file or a Hub repo id.

    Args:
        repo_or_dir: a local folder (``magi.download``'s layout), a config .json, or a Hub repo
            id such as ``sand-ai/MAGI-1`` (downloaded into ``cache_dir`` on first use).
        variant: the checkpoint: 4.5B_base, 4.5B_distill, 4.5B_distill_quant, 24B_base, ...
        cache_dir: where a Hub download goes (default ``cache_root()/<owner>--<name>``).

    Raises:
        FileNotFoundError: a folder without the checkpoint, or a path that does not exist.
        ValueError: an unknown variant. DownloadError: the download failed (one line).
    """
    path = Path(repo_or_dir).expanduser()
    if path.is_file():
        if path.suffix != ".json":
            raise ValueError(f"{path} is a file but not a config .json; pass the checkpoint folder or its config")
        return path
    if path.is_dir():
        return from_folder(path, variant)
    repo = str(repo_or_dir)
    if not _REPO_ID.match(repo) or repo.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{repo_or_dir} is neither a folder nor a Hub repo id such as {REPO_ID}"[:200])
    dest = Path(cache_dir).expanduser() if cache_dir is not None else cache_root() / repo.replace("/", "--")
    if (dest / f"{variant}_config.json").is_file():
        return dest / f"{variant}_config.json"
    _check_variant(variant)
    return download(variant, dest, repo_id=repo)
