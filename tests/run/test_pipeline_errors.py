"""MagiPipeline's bad inputs are one clear line, found before any model loads where possible.

Regression tests from the QA pass: each case used to be a TypeError / AssertionError / torch
RuntimeError, a misleading summary, or an error only after the DiT and the VAE had loaded.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import magi.checkpoint
from magi import video_io
from magi.config import CheckpointNotFoundError, load_config
from magi.pipeline import MagiPipeline, VideoWriteError, find_special_tokens, resolve_device
from magi.prepare import Request, prepare
from tests.helpers import TINY_CONFIG

TOKEN_FLAGS = (
    "PAD_HQ",
    "PAD_DURATION",
    "PAD_STATIC",
    "PAD_DYNAMIC",
    "PAD_BORDERNESS",
    "PAD_THREE_D_MODEL",
    "PAD_TWO_D_ANIME",
    "NEG_PROMPT",
)


@pytest.fixture(scope="module")
def tiny_dir(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny checkpoint, and magi.download's layout: the config and special_tokens.npz side by side
    (``checkpoints`` links to the shared tiny checkpoint)."""
    root = tmp_path_factory.mktemp("tiny")
    ck = root / "checkpoints"
    ck.symlink_to(tiny_checkpoint, target_is_directory=True)
    raw = json.loads(TINY_CONFIG.read_text())
    raw["runtime_config"].update(
        load=str(ck / "magi" / "tiny"), t5_pretrained=str(ck / "t5"), vae_pretrained=str(ck / "vae"), num_steps=4
    )
    (root / "config.json").write_text(json.dumps(raw))
    (root / "special_tokens.npz").write_bytes((ck / "special_tokens.npz").read_bytes())
    return root


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No special-token settings from the environment; a working directory without example/assets."""
    for name in TOKEN_FLAGS + ("SPECIAL_TOKEN_PATH", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


@pytest.fixture(scope="module")
def tiny_pipe(tiny_dir: Path) -> MagiPipeline:
    # a loaded config object (absolute paths) passes from_config's check_paths; the special
    # tokens (PAD_HQ, PAD_DURATION on by default) are found next to its file
    return MagiPipeline.from_config(load_config(tiny_dir / "config.json"), device="cpu")


@pytest.fixture
def no_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to load the DiT fails the test: the error must come first."""
    monkeypatch.setattr(magi.checkpoint, "load_dit", lambda *a, **k: pytest.fail("loaded the DiT"))


def _one_line(err: BaseException) -> str:
    text = str(err)
    assert text and len(text.splitlines()) == 1, text
    return text


# ------------------------------------------------------------------ #5 interrupted before chunk 0
def test_interrupt_before_the_first_chunk_says_nothing_written(
    tiny_pipe: MagiPipeline, tmp_path: Path, clean_env: Path, caplog
) -> None:
    def ctrl_c(info) -> None:
        raise KeyboardInterrupt  # a second Ctrl-C during the first step

    out = tmp_path / "v.mp4"
    result = tiny_pipe.generate(
        "t2v", "a", output_path=out, num_frames=24, callback=ctrl_c, save_tensors=tmp_path / "t.safetensors"
    )
    assert result.interrupted and result.chunks_done == 0 and result.output_path is None
    assert result.summary() == "interrupted before the first chunk was done; nothing written"
    # the library logs it (never prints): one warning line
    said = [r.getMessage() for r in caplog.records if r.name.startswith("magi") and r.levelname == "WARNING"]
    assert said == ["interrupted before the first chunk was done; nothing written"]
    assert list(tmp_path.iterdir()) == [clean_env]  # no mp4, no partial file, no tensors


# ------------------------------------------------------------------------------ #6 device check
@pytest.mark.parametrize(
    "device, expected",
    [
        ("cuda", "device cuda: CUDA is not available on this machine; use cpu"),
        ("cuda:0", "device cuda:0: CUDA is not available on this machine; use cpu"),
        ("foo", "device foo is not a device; use cuda, cuda:N or cpu"),
        ("meta", "device meta: magi runs on cuda, cuda:N or cpu"),
        (3.5, "device 3.5 is not a device; use cuda, cuda:N or cpu"),
    ],
)
def test_bad_device_is_one_value_error_before_loading(
    tiny_dir: Path, no_loading: None, monkeypatch, device: object, expected: str
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU-only machine
    with pytest.raises(ValueError) as info:
        MagiPipeline.from_config(tiny_dir / "config.json", device=device)
    assert _one_line(info.value) == expected


def test_device_helper_defaults_and_labels(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ValueError, match=r"^--device gpu is not a device"):
        resolve_device("gpu", label="--device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(
        ValueError, match=r"^device cuda:2: this machine has 2 CUDA device\(s\) \(cuda:0 \.\. cuda:1\)$"
    ):
        resolve_device("cuda:2")


# ------------------------------------------------------------------------ #7 request arguments
@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"prompt": None}, "prompt must be a string or a list of strings, got NoneType"),
        ({"prompt": 5}, "prompt must be a string or a list of strings, got int"),
        ({"prompt": ["a", None]}, "prompt must be a non-empty string or a non-empty list of non-empty strings"),
        ({"num_frames": 24.5}, "num_frames must be a whole number, got 24.5 (float)"),
        ({"num_frames": "24"}, "num_frames must be a whole number, got '24' (str)"),
        ({"num_frames": True}, "num_frames must be a whole number, got True (bool)"),
        ({"seed": "x"}, "seed must be a whole number, got 'x' (str)"),
        ({"seed": 1.0}, "seed must be a whole number, got 1.0 (float)"),
        ({"seed": 2**64}, f"seed {2**64} does not fit in 64 bits, as torch.manual_seed needs"),
    ],
)
def test_bad_request_types_are_one_value_error(
    tiny_pipe: MagiPipeline, tmp_path: Path, kwargs: dict, expected: str
) -> None:
    request = {"mode": "t2v", "prompt": "a", "num_frames": 24, "output_path": tmp_path / "v.mp4", **kwargs}
    with pytest.raises(ValueError) as info:
        tiny_pipe.generate(**request)
    assert _one_line(info.value) == expected
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match=expected.split(",")[0].replace("(", r"\(").replace(")", r"\)")):
        next(tiny_pipe.stream(**{k: v for k, v in request.items() if k != "output_path"}))


def test_numpy_integers_are_whole_numbers(tiny_pipe: MagiPipeline) -> None:
    np = pytest.importorskip("numpy")
    run = prepare(
        tiny_pipe.engine, tiny_pipe.prompts, Request("t2v", ("a",), seed=np.int64(7), num_frames=np.int32(24))
    )
    assert run.seed == 7 and type(run.seed) is int and run.plan.chunk_num == 1


# ------------------------------------------------------- #8 special tokens next to the config
def test_api_finds_special_tokens_next_to_the_config(
    tiny_dir: Path, tiny_pipe: MagiPipeline, clean_env: Path, monkeypatch
) -> None:
    # no $SPECIAL_TOKEN_PATH, no example/assets/ in the working directory: the file next to the
    # config (where magi.download writes it) is used, as the CLI does
    assert find_special_tokens(tiny_pipe.config) == tiny_dir / "special_tokens.npz"
    pipe = MagiPipeline.from_config(tiny_dir / "config.json", device="cpu")
    beside = list(pipe.stream("t2v", "a", num_frames=24, seed=1))
    # the same tokens named by the variable give the same video: the file was really read
    monkeypatch.setenv("SPECIAL_TOKEN_PATH", str(tiny_dir / "checkpoints" / "special_tokens.npz"))
    pipe.prompts.forget()  # the special tokens are looked up again
    named = list(pipe.stream("t2v", "a", num_frames=24, seed=1))
    assert len(beside) == 1 and torch.equal(beside[0].latent, named[0].latent)
    monkeypatch.setenv("PAD_HQ", "0")
    monkeypatch.setenv("PAD_DURATION", "0")
    plain = list(pipe.stream("t2v", "a", num_frames=24, seed=1))
    assert not torch.equal(plain[0].latent, named[0].latent)  # the tokens did change the captions


def test_missing_special_tokens_fail_before_loading(
    tiny_dir: Path, clean_env: Path, no_loading: None, monkeypatch
) -> None:
    lonely = clean_env / "config.json"  # no special_tokens.npz next to this copy
    lonely.write_text((tiny_dir / "config.json").read_text())
    with pytest.raises(FileNotFoundError) as info:
        MagiPipeline.from_config(lonely, device="cpu")
    assert _one_line(info.value).startswith("special_tokens.npz not found: set SPECIAL_TOKEN_PATH")
    assert str(info.value).endswith(
        "(needed for HQ_TOKEN, DURATION_TOKEN; PAD_HQ and PAD_DURATION are on unless set to 0)"
    )
    monkeypatch.setenv("SPECIAL_TOKEN_PATH", "nope.npz")
    with pytest.raises(FileNotFoundError, match=r"^SPECIAL_TOKEN_PATH=nope.npz does not exist"):
        MagiPipeline.from_config(tiny_dir / "config.json", device="cpu")
    # a preset's "source" is not a file: nothing is looked for in the working directory
    monkeypatch.delenv("SPECIAL_TOKEN_PATH")
    (clean_env / "special_tokens.npz").write_bytes(b"x")  # in the working directory: not a place looked at
    preset = dataclasses.replace(load_config(lonely), source="preset tiny")
    with pytest.raises(FileNotFoundError, match="special_tokens.npz not found"):
        find_special_tokens(preset)
    official = clean_env / "example" / "assets"
    official.mkdir(parents=True)
    (official / "special_tokens.npz").write_bytes(b"x")
    assert find_special_tokens(preset) == official / "special_tokens.npz"


# ------------------------------------------------------------------- #9 checkpoints checked first
def test_missing_t5_is_reported_before_the_dit_loads(tiny_dir: Path, clean_env: Path, no_loading: None) -> None:
    cfg = load_config(tiny_dir / "config.json")
    gone = dataclasses.replace(cfg.runtime, t5_pretrained=str(clean_env / "no_t5"))
    with pytest.raises(CheckpointNotFoundError) as info:
        MagiPipeline.from_config(cfg.replace(runtime=gone), device="cpu")
    assert "'runtime_config.t5_pretrained': no T5 model in" in _one_line(info.value)
    assert str(clean_env / "no_t5") in str(info.value)


# ---------------------------------------------------------------------- #3 the mp4 writer failing
def test_writer_failure_is_a_video_write_error_and_leaves_nothing(
    tiny_pipe: MagiPipeline, tmp_path: Path, monkeypatch
) -> None:
    def broken(self, frames) -> None:
        self.abort()
        raise RuntimeError(f"ffmpeg failed while writing {self.path}: [Errno 28] No space left on device")

    monkeypatch.setattr(video_io.Mp4Writer, "append", broken)
    with pytest.raises(VideoWriteError, match="No space left on device") as info:
        tiny_pipe.generate("t2v", "a", output_path=tmp_path / "v.mp4", num_frames=24)
    assert isinstance(info.value, RuntimeError)  # callers catching RuntimeError still do
    assert list(tmp_path.iterdir()) == []
