"""Write the tiny random MAGI-1 checkpoint set (``magi.tiny``) into a folder, for offline demos and tests.

    python scripts/make_tiny_checkpoint.py --out example/tiny/checkpoints

A thin command over ``magi.tiny.make_tiny_checkpoint`` (the layout is described there).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable as a plain script from a checkout
    sys.path.insert(0, str(REPO))

from magi.tiny import (  # noqa: E402  (re-exported: tests and tools reach them through this script)
    MAX_DIT_PARAMS,
    TINY_CONFIG,
    TINY_VAE_DDCONFIG,
    dit_parameter_count,
    make_tiny_checkpoint,
    tiny_config_dict,
    write_dit,
    write_special_tokens,
    write_t5,
    write_tokenizer,
    write_vae,
)

DEFAULT_CONFIG = REPO / "example" / "tiny" / "config.json"
__all__ = [
    "MAX_DIT_PARAMS",
    "TINY_CONFIG",
    "TINY_VAE_DDCONFIG",
    "dit_parameter_count",
    "make_tiny_checkpoint",
    "tiny_config_dict",
    "write_dit",
    "write_special_tokens",
    "write_t5",
    "write_tokenizer",
    "write_vae",
    "main",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="target folder (e.g. example/tiny/checkpoints)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="config whose model_config sizes the DiT")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    try:
        out = make_tiny_checkpoint(args.out, args.config, args.seed, args.force)
    except (ValueError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # e.g. a parent of --out is a file, or the folder is not writable
        print(f"error: cannot write {args.out}: {err.strerror or err}", file=sys.stderr)
        return 2
    print(f"wrote tiny checkpoint to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
