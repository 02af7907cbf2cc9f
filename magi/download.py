"""Official MAGI-1 weights: ``python -m magi.download <model> --dir downloads/``.

Downloads exactly one DiT checkpoint plus the T5 encoder and the VAE from the Hugging Face repo
``sand-ai/MAGI-1`` (resumable, through huggingface_hub), fetches the official
``special_tokens.npz`` from the official GitHub repository (checked by sha256), and writes
``<dir>/<model>_config.json``: the shipped config with its paths pointing at the downloaded files.
The files keep the repository's layout under ``<dir>``::

    <dir>/ckpt/magi/<model>/inference_weight[.fp8][.distill]/   DiT
    <dir>/ckpt/t5/t5-v1_1-xxl/                                  T5 (t5_pretrained = <dir>/ckpt/t5)
    <dir>/ckpt/vae/                                             VAE
    <dir>/special_tokens.npz, <dir>/<model>_config.json
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import os
import sys
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path

from magi.config import PRESET_NAMES, check_paths, config_from_dict, preset, preset_dict, save_config

REPO_ID = "sand-ai/MAGI-1"
SPECIAL_TOKENS_URL = "https://raw.githubusercontent.com/SandAI-org/MAGI-1/main/example/assets/special_tokens.npz"
SPECIAL_TOKENS_SHA256 = "b54bc664d5f4a722dfd8bb22201c025df61f22acddc07c0a2529d7b5cd6be5a7"
_TRUE = {"1", "true", "yes", "y", "on"}


class DownloadError(RuntimeError):
    """The download could not be done; the message (one line) says what to fetch by hand."""


def dit_folder(name: str) -> str:
    """Repository path of the DiT weight folder of checkpoint `name` (e.g. 4.5B_distill)."""
    return f"ckpt/magi/{name}/{preset(name).engine.weight_subdir}"


def allow_patterns(name: str) -> list[str]:
    """huggingface_hub allow-patterns selecting checkpoint `name`, the T5 encoder and the VAE."""
    return [f"{dit_folder(name)}/*", "ckpt/t5/*", "ckpt/vae/*"]


def select_files(name: str, repo_files: Iterable[str]) -> list[str]:
    """The repository files a download of `name` fetches (fnmatch, as huggingface_hub matches)."""
    patterns = allow_patterns(name)
    return [f for f in repo_files if any(fnmatch.fnmatch(f, p) for p in patterns)]


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def _manual_steps(name: str, dest: Path) -> str:
    return (
        f"download {dit_folder(name)}/, ckpt/t5/ and ckpt/vae/ from https://huggingface.co/{REPO_ID} "
        f"into {dest}/ (keeping the ckpt/... folders) and {SPECIAL_TOKENS_URL} to "
        f"{dest / 'special_tokens.npz'}, then rerun this command to write the config"
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fetch_bytes(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as response:
        return response.read()


def fetch_special_tokens(dest: Path) -> Path:
    """Put the official special_tokens.npz at dest/special_tokens.npz (sha256-checked); reuse a good copy."""
    target = dest / "special_tokens.npz"
    if target.is_file() and _sha256(target) == SPECIAL_TOKENS_SHA256:
        return target
    if _offline():
        raise DownloadError("HF_HUB_OFFLINE is set and special_tokens.npz is not there yet")
    data = _fetch_bytes(SPECIAL_TOKENS_URL)
    got = hashlib.sha256(data).hexdigest()
    if got != SPECIAL_TOKENS_SHA256:
        raise DownloadError(f"{SPECIAL_TOKENS_URL} has sha256 {got}, expected {SPECIAL_TOKENS_SHA256}")
    partial = target.with_suffix(".npz.part")
    partial.write_bytes(data)
    partial.replace(target)  # never leave a truncated file at the final path
    return target


def fetch_weights(name: str, dest: Path, repo_id: str = REPO_ID) -> None:
    """snapshot_download of the selected files into dest (resumes partial downloads)."""
    if _offline():
        wanted = [dest / dit_folder(name), dest / "ckpt" / "t5", dest / "ckpt" / "vae"]
        if not all(folder.is_dir() and any(folder.iterdir()) for folder in wanted):
            raise DownloadError(f"HF_HUB_OFFLINE is set and the weights are not in {dest}/ yet")
        return  # use what is already there; write_config checks the files
    from huggingface_hub import snapshot_download

    snapshot_download(repo_id, local_dir=dest, allow_patterns=allow_patterns(name))


def write_config(name: str, dest: Path) -> Path:
    """Write dest/<name>_config.json (the shipped config, paths at the downloaded files), checked."""
    data = preset_dict(name)
    root = dest.resolve()
    data["runtime_config"].update(
        load=str(root / "ckpt" / "magi" / name),
        t5_pretrained=str(root / "ckpt" / "t5"),
        vae_pretrained=str(root / "ckpt" / "vae"),
    )
    path = dest / f"{name}_config.json"
    cfg = config_from_dict(data, source=str(path))
    check_paths(cfg)
    save_config(cfg, path)
    return path


def download(name: str, dest: str | Path = "downloads", repo_id: str = REPO_ID) -> Path:
    """Fetch checkpoint `name`, T5, VAE and the special tokens into dest; return the written config.

    Args:
        name: one of 4.5B_base, 4.5B_distill, 4.5B_distill_quant, 24B_base, 24B_distill,
            24B_distill_quant.
        dest: target folder (created).
        repo_id: the Hugging Face repo holding the official layout (a mirror of sand-ai/MAGI-1).

    Raises:
        DownloadError: offline or failed; one line saying what to download and where to put it.
    """
    dest = Path(dest)
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a file in the way, or no write permission
        why = "a file is in the way" if isinstance(err, FileExistsError) else err.strerror or type(err).__name__
        raise DownloadError(f"cannot create the target folder {dest} ({why}); choose another --dir") from None
    try:
        fetch_weights(name, dest, repo_id)
        fetch_special_tokens(dest)
        return write_config(name, dest)
    except Exception as err:  # network, hub and missing-file errors all get the same advice
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DownloadError(f"cannot get {name} ({reason}); {_manual_steps(name, dest)}") from err


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m magi.download``; returns the exit status.

    Args:
        argv: the arguments (default sys.argv[1:]).
    """
    parser = argparse.ArgumentParser(
        prog="python -m magi.download",
        description=f"Download an official MAGI-1 checkpoint (+ T5 and VAE) from huggingface.co/{REPO_ID}.",
    )
    parser.add_argument("model", choices=PRESET_NAMES, help="which checkpoint")
    parser.add_argument("--dir", default="downloads", help="target folder (default: downloads)")
    args = parser.parse_args(argv)
    try:
        config = download(args.model, args.dir)
    except DownloadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {config}")
    print(f'next: python -m magi.infer --config {config} --mode t2v --prompt "Good Boy" --output_path out.mp4')
    return 0


if __name__ == "__main__":
    sys.exit(main())
