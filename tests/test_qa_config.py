"""Config values that used to pass validation and fail deep inside torch (QA regressions)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from magi.config import ConfigError, load_config

TINY_CONFIG = Path(__file__).resolve().parents[1] / "example" / "tiny" / "config.json"


def _write(tmp_path: Path, section: str, key: str, value: object) -> Path:
    raw = json.loads(TINY_CONFIG.read_text())
    raw[section][key] = value
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))  # json writes NaN / Infinity literals, as a hand edit could
    return path


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("runtime_config", "scale_factor", float("inf"), "'runtime_config.scale_factor' must be a finite number, got Infinity"),
        ("runtime_config", "clean_t", float("nan"), "'runtime_config.clean_t' must be a finite number, got NaN"),
        ("runtime_config", "cfg_t_range", [0.0, float("nan")], "'runtime_config.cfg_t_range' must be a list of finite numbers"),
        ("model_config", "layernorm_epsilon", float("-inf"), "'model_config.layernorm_epsilon' must be a finite number"),
        ("runtime_config", "seed", 2**64, r"'runtime_config.seed' \(18446744073709551616\) does not fit in 64 bits"),
        ("runtime_config", "seed", -(2**63) - 1, "does not fit in 64 bits"),
    ],
)
def test_rejected_with_one_line(tmp_path: Path, section: str, key: str, value: object, message: str) -> None:
    path = _write(tmp_path, section, key, value)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path)
    assert str(info.value).startswith(str(path)) and len(str(info.value).splitlines()) == 1


@pytest.mark.parametrize("seed", [0, -1, -(2**63), 2**64 - 1])
def test_every_seed_torch_accepts_is_valid(tmp_path: Path, seed: int) -> None:
    import torch

    assert load_config(_write(tmp_path, "runtime_config", "seed", seed)).runtime.seed == seed
    torch.Generator().manual_seed(seed)  # the range checked above is exactly torch's


def test_cli_seed_override_is_checked_before_loading(tmp_path: Path, capsys) -> None:
    from magi.infer import main

    status = main(["--config", str(TINY_CONFIG), "--mode", "t2v", "--prompt", "a cat", "--seed", str(2**70),
                   "--output_path", str(tmp_path / "out.mp4"), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "does not fit in 64 bits" in err[0]
