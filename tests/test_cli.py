"""python -m magi.infer: argument errors are one line, exit 2, and load nothing; valid calls reach
MagiPipeline with the documented keywords (a recording stand-in replaces the real pipeline here)."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from magi import infer
from magi.config import preset_dict

REPO = Path(__file__).resolve().parents[1]


class _Recorder:
    """Stands in for magi.pipeline.MagiPipeline and records what the CLI asks of it."""

    calls: list[tuple[str, dict]] = []

    @classmethod
    def from_config(cls, cfg, **kwargs):
        cls.calls.append(("from_config", {"cfg": cfg, **kwargs}))
        return cls()

    def generate(self, **kwargs):
        self.calls.append(("generate", kwargs))
        return types.SimpleNamespace(interrupted=False)


@pytest.fixture
def fake_pipeline(monkeypatch):
    _Recorder.calls = []
    module = types.ModuleType("magi.pipeline")
    module.MagiPipeline = _Recorder
    monkeypatch.setitem(sys.modules, "magi.pipeline", module)
    return _Recorder.calls


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A working directory with fake checkpoints, a config pointing at them, an image and a video."""
    for sub in ("ck/dit/inference_weight.distill", "ck/t5/t5-v1_1-xxl", "ck/vae"):
        (tmp_path / sub).mkdir(parents=True)
    (tmp_path / "ck/dit/inference_weight.distill/model.safetensors").write_bytes(b"x")
    (tmp_path / "ck/t5/t5-v1_1-xxl/config.json").write_text("{}")
    (tmp_path / "ck/vae/config.json").write_text("{}")
    (tmp_path / "ck/vae/diffusion_pytorch_model.safetensors").write_bytes(b"x")
    data = preset_dict("4.5B_distill")
    data["runtime_config"].update(load="ck/dit", t5_pretrained="ck/t5", vae_pretrained="ck/vae")
    (tmp_path / "cfg.json").write_text(json.dumps(data))
    (tmp_path / "img.jpg").write_bytes(b"x")
    (tmp_path / "pre.mp4").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    for flag in infer._TOKEN_FLAGS + ("SPECIAL_TOKEN_PATH", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(flag, raising=False)
    return tmp_path


BASE = ["--config", "cfg.json", "--output_path", "out.mp4", "--device", "cpu"]

ERRORS = [
    (["--mode", "i2v", "--prompt", "p"], "error: --mode i2v needs --image_path"),
    (["--mode", "v2v", "--prompt", "p"], "error: --mode v2v needs --prefix_video_path"),
    (["--mode", "i2v", "--prompt", "p", "--image_path", "nope.jpg"], "error: --image_path nope.jpg does not exist"),
    (["--mode", "v2v", "--prompt", "p", "--prefix_video_path", "nope.mp4"], "error: --prefix_video_path nope.mp4 does not exist"),
    (["--mode", "t2v", "--prompt", "p", "--image_path", "img.jpg"], "error: --image_path is only used with --mode i2v"),
    (["--mode", "x2v", "--prompt", "p"], "error: argument --mode: invalid choice: 'x2v'"),
    (["--mode", "t2v"], "error: --prompt is required (or --prompt_file"),
    (["--mode", "t2v", "--prompt", " "], "error: --prompt must not be empty"),
    (["--mode", "t2v", "--prompt", "p", "--output_path", "out.gif"], "error: --output_path out.gif must end in .mp4"),
    (["--mode", "t2v", "--prompt", "p", "--save_tensors", "t.pt"], "error: --save_tensors t.pt must end in .safetensors"),
    (["--mode", "t2v", "--prompt", "p", "--num_steps", "30"], "error: with --num_steps 30: cfg.json: 'runtime_config.num_steps' (30) must be divisible by window_size (4)"),
    (["--mode", "t2v", "--prompt", "p", "--video_size_h", "100"], "error: with --video_size_h 100: cfg.json: 'runtime_config.video_size_h' (100) must be a multiple of 16"),
    (["--mode", "t2v", "--prompt", "p", "--seed", "x"], "error: argument --seed: invalid int value: 'x'"),
    (["--mode", "t2v", "--prompt", "p", "--device", "gpu"], "error: --device gpu is not a device"),
    (["--mode", "t2v", "--prompt", "p", "--config", "missing.json"], "error: missing.json: cannot read the config file"),
    (["--mode", "t2v", "--prompt", "p", "--prompt_file", "t.json"], "error: give either --prompt or --prompt_file, not both"),
    (["--mode", "t2v", "--prompt", "p", "--attention_backend", "flash"], "error: --attention_backend flash: attention backend 'flash' runs bf16/fp16 on CUDA, not torch.bfloat16 on cpu"),
    (["--mode", "t2v", "--prompt", "p", "--attention_backend", "xformers"], "error: argument --attention_backend: invalid choice: 'xformers'"),
]


@pytest.mark.parametrize("extra, expected", ERRORS, ids=[e[1][:40] for e in ERRORS])
def test_argument_errors_are_one_line_exit_2_and_load_nothing(workdir, fake_pipeline, capsys, extra, expected):
    assert infer.main(BASE + extra) == 2
    err = capsys.readouterr().err
    assert err.startswith(expected), err
    assert err.count("\n") == 1
    assert fake_pipeline == []


def test_config_and_checkpoint_errors(workdir, fake_pipeline, capsys):
    data = json.loads((workdir / "cfg.json").read_text())
    data["runtime_config"]["cfg_number"] = 3
    (workdir / "bad.json").write_text(json.dumps(data))
    assert infer.main(["--config", "bad.json", "--mode", "t2v", "--prompt", "p", "--output_path", "o.mp4"]) == 2
    assert capsys.readouterr().err.startswith("error: bad.json: 'runtime_config.cfg_number' must be 1 for distill")

    data["runtime_config"].update(cfg_number=1, load="elsewhere")
    (workdir / "nock.json").write_text(json.dumps(data))
    assert infer.main(["--config", "nock.json", "--mode", "t2v", "--prompt", "p", "--output_path", "o.mp4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: nock.json: 'runtime_config.load': no DiT weights in") and err.count("\n") == 1
    assert fake_pipeline == []


def test_world_size_mismatch(workdir, fake_pipeline, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert infer.main(BASE + ["--mode", "t2v", "--prompt", "p"]) == 2
    assert "pp_size * cp_size = 1 but 2 process(es) were started" in capsys.readouterr().err


def test_special_tokens_needed_by_pad_flags(workdir, fake_pipeline, capsys, monkeypatch):
    monkeypatch.setenv("PAD_HQ", "1")
    assert infer.main(BASE + ["--mode", "t2v", "--prompt", "p"]) == 2
    assert capsys.readouterr().err.startswith("error: PAD_HQ need special_tokens.npz")
    monkeypatch.setenv("SPECIAL_TOKEN_PATH", "nope.npz")
    assert infer.main(BASE + ["--mode", "t2v", "--prompt", "p"]) == 2
    assert capsys.readouterr().err.startswith("error: SPECIAL_TOKEN_PATH=nope.npz does not exist")
    monkeypatch.delenv("SPECIAL_TOKEN_PATH")
    (workdir / "special_tokens.npz").write_bytes(b"x")  # next to cfg.json, as magi.download writes it
    assert infer.main(BASE + ["--mode", "t2v", "--prompt", "p"]) == 0
    import os

    assert os.environ["SPECIAL_TOKEN_PATH"] == str((workdir / "special_tokens.npz").resolve())
    assert fake_pipeline[0][0] == "from_config"


def test_valid_call_reaches_pipeline_with_overrides(workdir, fake_pipeline):
    argv = BASE + ["--mode", "i2v", "--image_path", "img.jpg", "--prompt", "a", "--prompt", "b",
                   "--seed", "7", "--num_steps", "16", "--compat", "official", "--save_tensors", "t.safetensors"]
    assert infer.main(argv) == 0
    (name0, build), (name1, gen) = fake_pipeline
    assert name0 == "from_config" and name1 == "generate"
    assert build["device"] == "cpu" and build["compat"] == "official"
    assert build["cfg"].runtime.seed == 7 and build["cfg"].runtime.num_steps == 16
    assert build["cfg"].runtime.num_frames == 96  # untouched
    assert gen == {
        "mode": "i2v", "prompt": ["a", "b"], "output_path": "out.mp4", "image_path": "img.jpg",
        "prefix_video_path": None, "save_tensors": "t.safetensors", "progress": True,
    }


def test_single_prompt_is_a_string(workdir, fake_pipeline):
    assert infer.main(BASE + ["--mode", "v2v", "--prefix_video_path", "pre.mp4", "--prompt", "go"]) == 0
    assert fake_pipeline[1][1]["prompt"] == "go"
    assert fake_pipeline[1][1]["prefix_video_path"] == "pre.mp4"


def test_prompt_file_timeline(workdir, fake_pipeline):
    timeline = [{"chunk": 0, "prompt": "a"}, {"chunk": 2, "prompt": "b"}, {"chunk": 3, "prompt": "c"}]
    (workdir / "t.json").write_text(json.dumps(timeline))
    assert infer.main(BASE + ["--mode", "t2v", "--prompt_file", "t.json"]) == 0
    assert fake_pipeline[1][1]["prompt"] == ["a", "a", "b", "c"]
    (workdir / "l.json").write_text(json.dumps(["x", "y"]))
    assert infer.read_prompt_file("l.json") == ["x", "y"]


@pytest.mark.parametrize(
    "content, expected",
    [
        ([{"chunk": 1, "prompt": "a"}], "the first entry must be chunk 0 (got chunk 1)"),
        ([{"chunk": 0, "prompt": "a"}, {"chunk": 0, "prompt": "b"}], "chunk indices must increase, but entry 1 has chunk 0 after 0"),
        ([{"chunk": 0, "text": "a"}], 'entry 0 must be {"chunk": <int>, "prompt": "<text>"}'),
        ([{"chunk": -1, "prompt": "a"}], "entry 0 needs a chunk index >= 0"),
        ([{"chunk": 0, "prompt": ""}], "entry 0 needs a chunk index >= 0 and a non-empty prompt"),
        (["a", ""], "prompts must not be empty"),
        ([], "expected a non-empty JSON list"),
    ],
)
def test_prompt_file_errors(workdir, content, expected):
    (workdir / "t.json").write_text(json.dumps(content))
    with pytest.raises(infer.UsageError, match=expected.replace("(", r"\(").replace(")", r"\)").replace("{", r"\{").replace("}", r"\}")):
        infer.read_prompt_file("t.json")


def test_missing_pipeline_says_generation_is_not_available(workdir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "magi.pipeline", None)  # import fails as if the module were absent
    assert infer.main(BASE + ["--mode", "t2v", "--prompt", "p"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: generation is not available yet") and err.count("\n") == 1


def test_subprocess_help_and_error():
    run = subprocess.run([sys.executable, "-m", "magi.infer", "--help"], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0 and "--prefix_video_path" in run.stdout and "--prompt_file" in run.stdout
    run = subprocess.run(
        [sys.executable, "-m", "magi.infer", "--config", "example/4.5B/4.5B_base_config.json", "--mode", "i2v",
         "--prompt", "p", "--output_path", "o.mp4"],
        capture_output=True, text=True, cwd=REPO,
    )
    assert run.returncode == 2
    assert run.stderr == "error: --mode i2v needs --image_path\n"
    assert "magi.pipeline" not in run.stdout


def test_speed_and_memory_flags_reach_from_config(workdir, fake_pipeline):
    argv = BASE + ["--mode", "t2v", "--prompt", "p"]
    assert infer.main(argv) == 0
    build = fake_pipeline[0][1]
    # defaults: auto attention, nothing streamed, no compile, VAE placement follows --offload
    assert (build["attention_backend"], build["offload_blocks"], build["compile"], build["vae_offload"]) == (
        "auto", False, False, None)
    fake_pipeline.clear()
    assert infer.main(argv + ["--attention_backend", "sdpa", "--offload", "--compile", "--vae_offload", "off"]) == 0
    build = fake_pipeline[0][1]
    assert (build["attention_backend"], build["offload_blocks"], build["compile"], build["vae_offload"]) == (
        "sdpa", True, True, False)
