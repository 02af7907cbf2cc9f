"""The pipeline's pre-load memory check: on CUDA it asks magi.plan whether the run fits the GPU
and refuses in one line; on CPU, with streamed layers, or with the override it does not ask."""

from __future__ import annotations

import pytest
import torch

import magi.plan
from magi.config import load_config
from magi.engine import check_memory
from tests.helpers import REPO_ROOT


class _Props:
    total_memory = 2**20  # 1 MiB: nothing fits


@pytest.fixture
def asked(monkeypatch) -> list:
    calls: list = []
    real = magi.plan.check_fits

    def spy(cfg, device_memory_bytes, **video):
        calls.append(device_memory_bytes)
        return real(cfg, device_memory_bytes, **video)

    monkeypatch.setattr(magi.plan, "check_fits", spy)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: _Props())
    return calls


def test_a_run_that_cannot_fit_the_gpu_is_refused_in_one_line(asked: list) -> None:
    cfg = load_config(REPO_ROOT / "example" / "tiny" / "config.json")
    with pytest.raises(ValueError) as info:
        check_memory(cfg, torch.device("cuda:0"))
    text = str(info.value)
    assert asked == [2**20] and "\n" not in text and len(text) <= 200
    assert "GiB per GPU but the GPU has 0.0 GiB" in text


def test_cpu_and_streamed_layers_are_not_checked(asked: list) -> None:
    cfg = load_config(REPO_ROOT / "example" / "tiny" / "config.json")
    check_memory(cfg, torch.device("cpu"))
    check_memory(cfg, torch.device("cuda:0"), offload_blocks=True)
    assert asked == []
