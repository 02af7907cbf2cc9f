"""``python -m magi.demo``: the offline tiny demo, from any directory, with no checkout.

Random tiny weights in the official checkpoint layout (``magi.tiny``), written once (seconds) into
the user cache (``magi.hub.cache_root()/tiny``), then the whole magi path on CPU: T5 -> DiT
sampling -> VAE decode -> mp4. The video is noise (the weights are random); it shows that
everything runs without downloads::

    python -m magi.demo                                  # writes ./magi_tiny_t2v.mp4
    python -m magi.demo --prompt "A cat" --output_path /tmp/x.mp4 --seed 7

Other arguments go to ``python -m magi.infer``. In a notebook:
``MagiPipeline.from_pretrained(magi.demo.tiny_folder(), variant="tiny", device="cpu")``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from magi.hub import cache_root
from magi.tiny import make_tiny_checkpoint, tiny_config_dict

CONFIG_NAME = "tiny_config.json"  # as magi.download names configs: from_pretrained(folder, variant="tiny")
DEFAULT_OUTPUT = "magi_tiny_t2v.mp4"


def tiny_folder(folder: str | Path | None = None) -> Path:
    """The tiny checkpoint folder (default ``cache_root()/tiny``), written on first use.

    It holds the official layout plus ``special_tokens.npz`` and ``tiny_config.json`` (absolute
    paths), so ``MagiPipeline.from_pretrained(folder, variant="tiny")`` loads it.
    """
    folder = Path(folder) if folder is not None else cache_root() / "tiny"
    config = folder / CONFIG_NAME
    if not (folder / "special_tokens.npz").is_file() or not config.is_file():
        make_tiny_checkpoint(folder, force=True)
        partial = config.with_name(f".{CONFIG_NAME}.{os.getpid()}.part")
        partial.write_text(json.dumps(tiny_config_dict(folder), indent=4) + "\n")
        partial.replace(config)
    return folder


def _has(args: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def main(argv: Sequence[str] | None = None) -> int:
    """Write the tiny checkpoint if needed, then run ``magi.infer`` t2v on CPU; the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if _has(args, "-h") or _has(args, "--help"):
        print(__doc__.split("\n\n")[0] + "\n" + __doc__.split("\n\n")[2].strip())
        return 0
    try:
        folder = tiny_folder()
    except (OSError, ValueError) as err:
        print(
            f"error: cannot write the tiny checkpoint into {cache_root() / 'tiny'} ({err}); "
            "set MAGI_CACHE to a writable folder",
            file=sys.stderr,
        )
        return 2
    os.environ["SPECIAL_TOKEN_PATH"] = str(folder / "special_tokens.npz")
    os.environ.setdefault("PAD_HQ", "1")
    os.environ.setdefault("PAD_DURATION", "1")
    defaults = [
        ("--config", str(folder / CONFIG_NAME)),
        ("--mode", "t2v"),
        ("--prompt", "Good Boy"),
        ("--output_path", DEFAULT_OUTPUT),
        ("--device", "cpu"),
    ]
    for flag, value in defaults:
        if not _has(args, flag) and not (flag == "--config" and _has(args, "--config_file")):
            if flag in ("--mode", "--prompt") and (_has(args, "--resume") or _has(args, "--extend")):
                continue  # a resumed / extended run takes them from its state (or needs its own)
            if flag == "--prompt" and _has(args, "--prompt_file"):
                continue
            args += [flag, value]
    from magi.infer import main as infer_main

    return infer_main(args)


if __name__ == "__main__":
    sys.exit(main())
