"""python -m magi.infer: argument errors are one line, exit 2, and load nothing; valid calls reach
MagiPipeline with the documented keywords (a recording stand-in replaces the real pipeline here)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from magi import infer, pipeline as real_pipeline
from magi.generation import Control
from magi.video_io import Mp4Writer
from tests.cli.fakes import Recorder
from tests.helpers import REPO_ROOT as REPO

BASE = ["--config", "cfg.json", "--output_path", "out.mp4", "--device", "cpu"]

ERRORS = [
    (["--mode", "i2v", "--prompt", "p"], "error: --mode i2v needs --image_path"),
    (["--mode", "v2v", "--prompt", "p"], "error: --mode v2v needs --prefix_video_path"),
    (["--mode", "i2v", "--prompt", "p", "--image_path", "nope.jpg"], "error: --image_path nope.jpg does not exist"),
    (
        ["--mode", "v2v", "--prompt", "p", "--prefix_video_path", "nope.mp4"],
        "error: --prefix_video_path nope.mp4 does not exist",
    ),
    (["--mode", "t2v", "--prompt", "p", "--image_path", "img.ppm"], "error: --image_path is only used with --mode i2v"),
    (["--mode", "x2v", "--prompt", "p"], "error: argument --mode: invalid choice: 'x2v'"),
    (["--mode", "t2v"], "error: --prompt is required (or --prompt_file"),
    (["--mode", "t2v", "--prompt", " "], "error: --prompt must not be empty"),
    (["--mode", "t2v", "--prompt", "p", "--output_path", "out.gif"], "error: --output_path out.gif must end in .mp4"),
    (
        ["--mode", "t2v", "--prompt", "p", "--save_tensors", "t.pt"],
        "error: --save_tensors t.pt must end in .safetensors",
    ),
    (
        ["--mode", "t2v", "--prompt", "p", "--num_steps", "30"],
        "error: with --num_steps 30: cfg.json: 'runtime_config.num_steps' (30) must be divisible by window_size (4)",
    ),
    (
        ["--mode", "t2v", "--prompt", "p", "--video_size_h", "100"],
        "error: with --video_size_h 100: cfg.json: 'runtime_config.video_size_h' (100) must be a multiple of 16",
    ),
    (["--mode", "t2v", "--prompt", "p", "--seed", "x"], "error: argument --seed: invalid int value: 'x'"),
    (["--mode", "t2v", "--prompt", "p", "--device", "gpu"], "error: --device gpu is not a device"),
    (
        ["--mode", "t2v", "--prompt", "p", "--config", "missing.json"],
        "error: missing.json: cannot read the config file",
    ),
    (
        ["--mode", "t2v", "--prompt", "p", "--prompt_file", "t.json"],
        "error: give either --prompt or --prompt_file, not both",
    ),
    (
        ["--mode", "t2v", "--prompt", "p", "--attention_backend", "flash"],
        "error: --attention_backend flash: attention backend 'flash' runs bf16/fp16 on CUDA, not torch.bfloat16 on cpu",
    ),
    (
        ["--mode", "t2v", "--prompt", "p", "--attention_backend", "xformers"],
        "error: argument --attention_backend: invalid choice: 'xformers'",
    ),
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
    err = capsys.readouterr().err
    assert err.startswith("error: special_tokens.npz not found: set SPECIAL_TOKEN_PATH") and err.count("\n") == 1
    assert err.endswith("(needed for HQ_TOKEN; PAD_HQ and PAD_DURATION are on unless set to 0)\n")
    monkeypatch.delenv("PAD_HQ")  # unset: on by default, as officially
    monkeypatch.delenv("PAD_DURATION")
    assert infer.main(BASE + ["--mode", "t2v", "--prompt", "p"]) == 2
    assert "(needed for HQ_TOKEN, DURATION_TOKEN;" in capsys.readouterr().err
    monkeypatch.setenv("SPECIAL_TOKEN_PATH", "nope.npz")
    assert infer.main(BASE + ["--mode", "t2v", "--prompt", "p"]) == 2
    assert capsys.readouterr().err.startswith("error: SPECIAL_TOKEN_PATH=nope.npz does not exist")
    monkeypatch.delenv("SPECIAL_TOKEN_PATH")
    (workdir / "special_tokens.npz").write_bytes(b"x")  # next to cfg.json, as magi.download writes it
    assert infer.main(BASE + ["--mode", "t2v", "--prompt", "p"]) == 0
    # found by the pipeline's own lookup (the API finds it too); the environment is left alone
    assert "SPECIAL_TOKEN_PATH" not in __import__("os").environ
    assert real_pipeline.find_special_tokens(fake_pipeline[0][1]["cfg"]) == workdir / "special_tokens.npz"
    assert fake_pipeline[0][0] == "from_config"


def test_valid_call_reaches_pipeline_with_overrides(workdir, fake_pipeline):
    argv = BASE + [
        "--mode",
        "i2v",
        "--image_path",
        "img.ppm",
        "--prompt",
        "a",
        "--prompt",
        "b",
        "--seed",
        "7",
        "--num_steps",
        "16",
        "--compat",
        "official",
        "--save_tensors",
        "t.safetensors",
    ]
    assert infer.main(argv) == 0
    (name0, build), (name1, gen) = fake_pipeline
    assert name0 == "from_config" and name1 == "generate"
    assert build["device"] == "cpu" and build["compat"] == "official"
    assert build["cfg"].runtime.seed == 7 and build["cfg"].runtime.num_steps == 16
    assert build["cfg"].runtime.num_frames == 96  # untouched
    control = gen.pop("control")  # the CLI's own: its stop signals stop the run through it
    assert isinstance(control, Control) and not control.stopping and control.pending == 0  # no --steer
    assert gen == {
        "mode": "i2v",
        "prompt": ["a", "b"],
        "output_path": "out.mp4",
        "image_path": "img.ppm",
        "prefix_video_path": None,
        "save_tensors": "t.safetensors",
        "progress": True,
        "save_state": None,
        "save_every": 1,
        "segments": None,  # no --save_state: no segment folder
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
        (
            [{"chunk": 0, "prompt": "a"}, {"chunk": 0, "prompt": "b"}],
            "chunk indices must increase, but entry 1 has chunk 0 after 0",
        ),
        ([{"chunk": 0, "text": "a"}], 'entry 0 must be {"chunk": <int>, "prompt": "<text>"}'),
        ([{"chunk": -1, "prompt": "a"}], "entry 0 needs a chunk index >= 0"),
        ([{"chunk": 0, "prompt": ""}], "entry 0 needs a chunk index >= 0 and a non-empty prompt"),
        (["a", ""], "prompts must not be empty"),
        ([], "expected a non-empty JSON list"),
    ],
)
def test_prompt_file_errors(workdir, content, expected):
    (workdir / "t.json").write_text(json.dumps(content))
    with pytest.raises(
        infer.UsageError, match=expected.replace("(", r"\(").replace(")", r"\)").replace("{", r"\{").replace("}", r"\}")
    ):
        infer.read_prompt_file("t.json")


def test_missing_pipeline_says_generation_is_not_available(workdir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "magi.pipeline", None)  # import fails as if the module were absent
    assert infer.main(BASE + ["--mode", "t2v", "--prompt", "p"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: generation is not available in this build") and err.count("\n") == 1


def test_subprocess_help_and_error():
    run = subprocess.run([sys.executable, "-m", "magi.infer", "--help"], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0 and "--prefix_video_path" in run.stdout and "--prompt_file" in run.stdout
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "magi.infer",
            "--config",
            "example/4.5B/4.5B_base_config.json",
            "--mode",
            "i2v",
            "--prompt",
            "p",
            "--output_path",
            "o.mp4",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
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
        "auto",
        False,
        False,
        None,
    )
    fake_pipeline.clear()
    assert infer.main(argv + ["--attention_backend", "sdpa", "--offload", "--compile", "--vae_offload", "off"]) == 0
    build = fake_pipeline[0][1]
    assert (build["attention_backend"], build["offload_blocks"], build["compile"], build["vae_offload"]) == (
        "sdpa",
        True,
        True,
        False,
    )


# ------------------------------------------------------------------------ QA regressions
def _one_line(err: str) -> str:
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_output_below_a_file_is_one_line_exit_2(workdir, fake_pipeline, capsys):
    (workdir / "notes.txt").write_text("a file, not a folder")
    assert infer.main(BASE[:2] + ["--mode", "t2v", "--prompt", "p", "--output_path", "notes.txt/out.mp4"]) == 2
    err = _one_line(capsys.readouterr().err)
    assert err.startswith("error: --output_path notes.txt/out.mp4: notes.txt is a file, not a folder")
    assert infer.main(BASE[:2] + ["--mode", "t2v", "--prompt", "p", "--output_path", "notes.txt/a/b/out.mp4"]) == 2
    assert "notes.txt is a file" in _one_line(capsys.readouterr().err)
    argv = BASE + ["--mode", "t2v", "--prompt", "p", "--save_tensors", "notes.txt/t.safetensors"]
    assert infer.main(argv) == 2
    assert _one_line(capsys.readouterr().err).startswith(
        "error: --save_tensors notes.txt/t.safetensors: notes.txt is a file"
    )
    assert fake_pipeline == []


def test_output_folder_is_created_and_probed_before_loading(workdir, fake_pipeline, capsys):
    argv = BASE[:2] + [
        "--mode",
        "t2v",
        "--prompt",
        "p",
        "--output_path",
        "new/deeper/out.mp4",
        "--device",
        "cpu",
        "--save_tensors",
        "t/x.safetensors",
    ]
    assert infer.main(argv) == 0
    assert (workdir / "new/deeper").is_dir() and (workdir / "t").is_dir()
    assert list((workdir / "new/deeper").iterdir()) == []  # the probe left no file behind
    if __import__("os").geteuid() == 0:
        return  # root writes into read-only folders: the permission half cannot fail here
    locked = workdir / "locked"
    locked.mkdir(mode=0o500)
    fake_pipeline.clear()
    assert infer.main(BASE[:2] + ["--mode", "t2v", "--prompt", "p", "--output_path", "locked/out.mp4"]) == 2
    err = _one_line(capsys.readouterr().err)
    assert err.startswith("error: --output_path locked/out.mp4: cannot write the output video in locked")
    assert infer.main(BASE[:2] + ["--mode", "t2v", "--prompt", "p", "--output_path", "locked/sub/out.mp4"]) == 2
    assert "cannot create the folder locked/sub" in _one_line(capsys.readouterr().err)
    assert fake_pipeline == []


def test_ctrl_c_before_generation_is_one_line_exit_130(workdir, fake_pipeline, capsys, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Recorder, "from_config", classmethod(interrupt))  # while the models load
    assert infer.main(BASE + ["--mode", "t2v", "--prompt", "p"]) == 130
    assert capsys.readouterr().err == "interrupted before generation started; nothing written\n"
    monkeypatch.setattr(infer, "_check_attention", interrupt)  # while torch / magi.attention import
    assert infer.main(BASE + ["--mode", "t2v", "--prompt", "p"]) == 130
    assert capsys.readouterr().err == "interrupted before generation started; nothing written\n"
    assert not (workdir / "out.mp4").exists()


@pytest.mark.parametrize(
    "error",
    [
        real_pipeline.VideoWriteError("ffmpeg failed while writing out.mp4: [Errno 32] Broken pipe"),
        PermissionError(13, "Permission denied"),
        OSError(28, "No space left on device"),
    ],
    ids=["ffmpeg", "permission", "disk_full"],
)
def test_write_errors_during_generation_are_one_line_exit_1(workdir, fake_pipeline, capsys, monkeypatch, error):
    def fail(self, **kwargs):
        raise error

    monkeypatch.setattr(Recorder, "generate", fail)
    monkeypatch.delenv("MAGI_DEBUG", raising=False)
    assert infer.main(BASE + ["--mode", "t2v", "--prompt", "p"]) == 1
    err = _one_line(capsys.readouterr().err)
    assert err.startswith("error: ") and err.endswith("(set MAGI_DEBUG=1 for the traceback)\n")
    assert str(error).splitlines()[0] in err


def test_other_runtime_errors_keep_their_traceback(workdir, fake_pipeline, monkeypatch):
    def fail(self, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(Recorder, "generate", fail)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        infer.main(BASE + ["--mode", "t2v", "--prompt", "p"])


def test_undecodable_inputs_fail_before_loading(workdir, fake_pipeline, capsys):
    (workdir / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    assert infer.main(BASE + ["--mode", "i2v", "--prompt", "p", "--image_path", "bad.png"]) == 2
    assert _one_line(capsys.readouterr().err).startswith("error: --image_path: cannot decode image bad.png")
    (workdir / "bad.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 20)
    assert infer.main(BASE + ["--mode", "v2v", "--prompt", "p", "--prefix_video_path", "bad.mp4"]) == 2
    assert _one_line(capsys.readouterr().err).startswith("error: --prefix_video_path: cannot decode video bad.mp4")
    with Mp4Writer(workdir / "short.mp4", 24) as writer:
        writer.append(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    assert infer.main(BASE + ["--mode", "v2v", "--prompt", "p", "--prefix_video_path", "short.mp4"]) == 2
    err = _one_line(capsys.readouterr().err)
    assert err.startswith("error: --prefix_video_path: v2v prefix has 2 frame(s) at the runtime fps; at least 4")
    assert fake_pipeline == []


def test_device_check_is_the_pipelines(workdir, fake_pipeline, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert infer.main(BASE[:-1] + ["cuda:1", "--mode", "t2v", "--prompt", "p"]) == 2
    assert _one_line(capsys.readouterr().err) == (
        "error: --device cuda:1: CUDA is not available on this machine; use cpu\n"
    )
    assert infer.main(BASE[:-1] + ["meta", "--mode", "t2v", "--prompt", "p"]) == 2
    assert _one_line(capsys.readouterr().err) == "error: --device meta: magi runs on cuda, cuda:N or cpu\n"
    assert fake_pipeline == []
