"""python -m magi.infer refuses hostile or impossible requests in one ``error:`` line, exit 2,
before any model loads: undecodable prompts, timelines past the video, unwritable tensor files,
an output onto its own input, and requests too big for the disk or the memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from magi import budget, infer
from tests.helpers import REPO_ROOT as REPO

BASE = ["--config", "cfg.json", "--output_path", "out.mp4", "--device", "cpu"]  # the workdir's config
GIB = 2**30
T2V = BASE + ["--mode", "t2v"]


def _refused(argv: list[str], capsys, calls: list) -> str:
    """Run the CLI; assert exit 2, exactly one error line, nothing loaded; return the line."""
    assert infer.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert calls == []
    return err.strip()


@pytest.fixture
def machine(monkeypatch):
    """A fixed machine for the budget: 64 GiB of memory, 100 GiB free in the temporary folder."""
    monkeypatch.setattr(budget, "ram_bytes", lambda: 64 * GIB)
    monkeypatch.setattr(budget, "free_tmp_bytes", lambda folder=None: 100 * GIB)


# ---------------------------------------------------------------------------------- prompts
def test_prompt_with_non_utf8_bytes_is_refused(workdir, fake_pipeline, capsys):
    # on Linux, argv bytes that are not UTF-8 arrive as surrogateescape code points
    bad = b"a cat \xff".decode("utf-8", "surrogateescape")
    err = _refused(T2V + ["--prompt", bad], capsys, fake_pipeline)
    assert err.startswith("error: --prompt is not valid UTF-8 text (byte 0xff at character 6)")
    err = _refused(T2V + ["--prompt", "ok", "--prompt", "x\ud800"], capsys, fake_pipeline)
    assert err.startswith("error: --prompt 2 is not valid UTF-8 text (lone surrogate U+D800 at character 1)")


def test_non_utf8_argv_bytes_in_a_real_process(workdir):
    argv = [os.fsencode(a) for a in [sys.executable, "-m", "magi.infer", *T2V, "--prompt"]] + [b"caf\xe9"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "LC_ALL": "C.UTF-8"}
    run = subprocess.run(argv, capture_output=True, env=env, cwd=workdir, timeout=120)
    assert run.returncode == 2, run.stderr
    assert run.stderr.decode().strip() == (
        "error: --prompt is not valid UTF-8 text (byte 0xe9 at character 3); "
        "pass UTF-8 text (check the terminal's or file's encoding)"
    )


def test_prompt_file_not_utf8_names_the_file(workdir, fake_pipeline, capsys):
    (workdir / "latin1.json").write_bytes('["un café"]'.encode("latin-1"))
    err = _refused(T2V + ["--prompt_file", "latin1.json"], capsys, fake_pipeline)
    assert err.startswith("error: --prompt_file latin1.json: not UTF-8 text (byte 0xe9 at offset 8)")


def test_prompt_file_with_a_bom_works(workdir, fake_pipeline):
    (workdir / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(["un caf\u00e9", "b"]).encode())
    _, request, _ = infer.prepare(T2V + ["--prompt_file", "bom.json"])
    assert request.prompt == ["un café", "b"]


def test_prompt_file_escape_to_a_lone_surrogate_is_refused(workdir, fake_pipeline, capsys):
    (workdir / "s.json").write_text('["fine", "bad \\ud800"]')
    err = _refused(T2V + ["--prompt_file", "s.json"], capsys, fake_pipeline)
    assert err.startswith("error: --prompt_file s.json: prompt 1 is not valid UTF-8 text (lone surrogate U+D800")
    (workdir / "t.json").write_text('[{"chunk": 0, "prompt": "\\udcff"}]')
    err = _refused(T2V + ["--prompt_file", "t.json"], capsys, fake_pipeline)
    assert err.startswith("error: --prompt_file t.json: entry 0 is not valid UTF-8 text (byte 0xff")


def test_deeply_nested_prompt_file_is_one_line(workdir, fake_pipeline, capsys):
    (workdir / "deep.json").write_text("[" * 200_000 + "]" * 200_000)
    err = _refused(T2V + ["--prompt_file", "deep.json"], capsys, fake_pipeline)
    assert err.startswith("error: --prompt_file deep.json: JSON nested too deeply")


def test_nested_timeline_entry_is_shown_short(workdir, fake_pipeline, capsys):
    (workdir / "n.json").write_text("[" + "[" * 500 + "]" * 500 + "]")
    err = _refused(T2V + ["--prompt_file", "n.json"], capsys, fake_pipeline)
    assert "entry 0 must be" in err and len(err) < 400


# ---------------------------------------------------------------------------------- timeline
def test_timeline_chunk_beyond_the_video_is_refused_without_expanding(workdir, fake_pipeline, capsys):
    (workdir / "huge.json").write_text(json.dumps([{"chunk": 1_000_000_000, "prompt": "x"}]))
    err = _refused(T2V + ["--prompt_file", "huge.json"], capsys, fake_pipeline)
    assert err == (
        "error: --prompt_file huge.json: entry 0 starts at chunk 1000000000 but the video has "
        "only 4 chunks (num_frames 96); lower it or raise --num_frames"
    )


def test_timeline_last_chunk_is_accepted_and_the_next_refused(workdir, fake_pipeline, capsys):
    (workdir / "t.json").write_text(json.dumps([{"chunk": 0, "prompt": "a"}, {"chunk": 3, "prompt": "b"}]))
    _, request, _ = infer.prepare(T2V + ["--prompt_file", "t.json"])  # 96 frames: chunks 0..3
    assert request.prompt == ["a", "a", "a", "b"]
    (workdir / "t.json").write_text(json.dumps([{"chunk": 0, "prompt": "a"}, {"chunk": 4, "prompt": "b"}]))
    err = _refused(T2V + ["--prompt_file", "t.json"], capsys, fake_pipeline)
    assert "entry 1 starts at chunk 4 but the video has only 4 chunks (num_frames 96)" in err
    _, request, _ = infer.prepare(T2V + ["--prompt_file", "t.json", "--num_frames", "120"])
    assert len(request.prompt) == 5  # raising --num_frames makes room


def test_v2v_timeline_bound_never_refuses_a_valid_chunk(workdir, fake_pipeline):
    # a prefix may prefill part of the first chunk; the bound allows the most chunks any prefix gives
    (workdir / "t.json").write_text(json.dumps([{"chunk": 0, "prompt": "a"}, {"chunk": 4, "prompt": "b"}]))
    argv = BASE + ["--mode", "v2v", "--prefix_video_path", "pre.mp4", "--prompt_file", "t.json"]
    assert len(infer.prepare(argv)[1].prompt) == 5


# ---------------------------------------------------------------------------- --save_tensors
def test_save_tensors_onto_a_directory_is_refused(workdir, fake_pipeline, capsys):
    (workdir / "d.safetensors").mkdir()
    err = _refused(T2V + ["--prompt", "p", "--save_tensors", "d.safetensors"], capsys, fake_pipeline)
    assert err.startswith("error: --save_tensors d.safetensors is a directory")


def test_save_tensors_where_no_file_can_be_created(workdir, fake_pipeline, capsys, monkeypatch):
    # root ignores folder permissions, so the refusal is simulated where the probe creates its file
    locked, real_open = workdir / "locked", os.open

    def refuse(path, *args, **kwargs):
        if os.path.dirname(os.path.abspath(path)) == str(locked):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    locked.mkdir()
    monkeypatch.setattr(os, "open", refuse)
    err = _refused(T2V + ["--prompt", "p", "--save_tensors", "locked/t.safetensors"], capsys, fake_pipeline)
    assert err == (
        "error: --save_tensors locked/t.safetensors: cannot create a file in locked "
        "(Permission denied); choose a writable folder"
    )
    (locked / "t.safetensors").write_bytes(b"old")  # an existing file: the probe goes beside it
    err = _refused(T2V + ["--prompt", "p", "--save_tensors", "locked/t.safetensors"], capsys, fake_pipeline)
    assert "cannot create a file in locked (Permission denied)" in err


def test_save_tensors_name_too_long_for_the_file_system(workdir, fake_pipeline, capsys):
    name = "x" * 300 + ".safetensors"
    err = _refused(T2V + ["--prompt", "p", "--save_tensors", name], capsys, fake_pipeline)
    assert "cannot create a file in . (File name too long)" in err


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_save_tensors_in_a_read_only_folder(workdir, fake_pipeline, capsys):
    (workdir / "ro").mkdir(mode=0o500)
    err = _refused(T2V + ["--prompt", "p", "--save_tensors", "ro/t.safetensors"], capsys, fake_pipeline)
    assert "cannot create a file in ro (Permission denied)" in err


def test_save_tensors_probe_leaves_nothing(workdir, fake_pipeline):
    (workdir / "out").mkdir()
    (workdir / "out/old.safetensors").write_bytes(b"keep")
    infer.prepare(T2V + ["--prompt", "p", "--save_tensors", "out/new.safetensors"])
    infer.prepare(T2V + ["--prompt", "p", "--save_tensors", "out/old.safetensors"])
    assert sorted(p.name for p in (workdir / "out").iterdir()) == ["old.safetensors"]
    assert (workdir / "out/old.safetensors").read_bytes() == b"keep"


# --------------------------------------------------------------------- output onto the input
@pytest.mark.parametrize("output", ["pre.mp4", "./sub/../pre.mp4", "link.mp4", "hard.mp4"])
def test_v2v_output_onto_the_prefix_video_is_refused(workdir, fake_pipeline, capsys, output):
    (workdir / "sub").mkdir()
    os.symlink("pre.mp4", workdir / "link.mp4")
    os.link(workdir / "pre.mp4", workdir / "hard.mp4")
    before = (workdir / "pre.mp4").read_bytes()
    argv = BASE[:2] + ["--mode", "v2v", "--prompt", "p", "--prefix_video_path", "pre.mp4", "--output_path", output]
    err = _refused(argv, capsys, fake_pipeline)
    assert err == (
        f"error: --output_path {output} is the --prefix_video_path: writing it would overwrite "
        "the input video; choose another --output_path"
    )
    assert (workdir / "pre.mp4").read_bytes() == before


# ------------------------------------------------------------------------------ the budget
def test_huge_frame_is_refused_before_loading(workdir, fake_pipeline, capsys, machine):
    err = _refused(T2V + ["--prompt", "p", "--video_size_h", "100000"], capsys, fake_pipeline)
    # 4.5B: 6 x 6250 x 45 tokens x ffn 12288 float32 = 77.2 GiB for one chunk's widest layer
    assert err == (
        "error: 720x100000 px, 96 frames: one chunk (6 latent, 24 video frames) needs 77.2 GiB for its DiT "
        "activations, over this machine's 64.0 GiB; lower the size or runtime_config.chunk_width"
    )


def test_ten_million_frames_are_refused_for_the_noise_file(workdir, fake_pipeline, capsys, machine):
    err = _refused(T2V + ["--prompt", "p", "--num_frames", "10000000"], capsys, fake_pipeline)
    # 2500002 latent frames x 16 x 90 x 90 float32
    assert err.startswith(
        "error: 720x720 px, 10000000 frames: the initial noise (416667 chunks) needs 1207.0 GiB in TMPDIR ("
    )
    assert err.endswith(": 100.0 GiB free); lower --num_frames or the size")


def test_absurd_chunk_width_in_the_config_is_refused(workdir, fake_pipeline, capsys, machine):
    data = json.loads((workdir / "cfg.json").read_text())
    data["runtime_config"]["chunk_width"] = 1_000_000
    (workdir / "wide.json").write_text(json.dumps(data))
    err = _refused(["--config", "wide.json", *T2V[2:], "--prompt", "p"], capsys, fake_pipeline)
    assert "one chunk (1000000 latent, 3999997 video frames) needs" in err
    assert "lower the size or runtime_config.chunk_width" in err


def test_default_requests_fit(workdir, fake_pipeline, machine):
    for mode, extra in [("t2v", []), ("i2v", ["--image_path", "img.ppm"]), ("v2v", ["--prefix_video_path", "pre.mp4"])]:
        infer.prepare(BASE + ["--mode", mode, "--prompt", "p", *extra])
