"""magi.download without network: file selection is exact, offline and failed downloads give one
line of advice, a (simulated) download writes a config whose paths check out."""

from __future__ import annotations

import fnmatch
import hashlib
import urllib.error
from pathlib import Path

import pytest

from magi import download as dl
from magi.config import PRESET_NAMES, load_config

# A listing shaped like the Hugging Face repo sand-ai/MAGI-1.
REPO_FILES = [
    "README.md",
    ".gitattributes",
    "ckpt/t5/t5-v1_1-xxl/config.json",
    "ckpt/t5/t5-v1_1-xxl/spiece.model",
    "ckpt/t5/t5-v1_1-xxl/pytorch_model-00001-of-00002.bin",
    "ckpt/vae/config.json",
    "ckpt/vae/diffusion_pytorch_model.safetensors",
]
WEIGHT_DIRS = {
    "4.5B_base": "inference_weight",
    "4.5B_distill": "inference_weight.distill",
    "4.5B_distill_quant": "inference_weight.fp8.distill",
    "24B_base": "inference_weight",
    "24B_distill": "inference_weight.distill",
    "24B_distill_quant": "inference_weight.fp8.distill",
}
for _name, _sub in WEIGHT_DIRS.items():
    REPO_FILES += [
        f"ckpt/magi/{_name}/{_sub}/model.safetensors.index.json",
        f"ckpt/magi/{_name}/{_sub}/model-00001-of-00002.safetensors",
    ]


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_selection_is_exactly_one_checkpoint_plus_t5_and_vae(name):
    chosen = dl.select_files(name, REPO_FILES)
    sub = WEIGHT_DIRS[name]
    assert dl.allow_patterns(name) == [f"ckpt/magi/{name}/{sub}/*", "ckpt/t5/*", "ckpt/vae/*"]
    assert sorted(chosen) == sorted(
        [f for f in REPO_FILES if f.startswith(("ckpt/t5/", "ckpt/vae/"))]
        + [
            f"ckpt/magi/{name}/{sub}/model.safetensors.index.json",
            f"ckpt/magi/{name}/{sub}/model-00001-of-00002.safetensors",
        ]
    )
    assert not any(f.startswith("ckpt/magi/") and f"/{name}/" not in f for f in chosen)


def test_special_tokens_constant_matches_official_file(reference_dir):
    data = (reference_dir / "official_special_tokens.npz").read_bytes()
    assert hashlib.sha256(data).hexdigest() == dl.SPECIAL_TOKENS_SHA256


def _no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the test tried to use the network")

    monkeypatch.setattr(dl, "_fetch_bytes", refuse)
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)


def test_offline_fails_with_one_line_saying_what_to_fetch(tmp_path, monkeypatch, capsys):
    _no_network(monkeypatch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert dl.main(["4.5B_distill", "--dir", str(tmp_path / "dl")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("error: cannot get 4.5B_distill (HF_HUB_OFFLINE is set and the weights are not in")
    assert (
        "download ckpt/magi/4.5B_distill/inference_weight.distill/, ckpt/t5/ and ckpt/vae/ from https://huggingface.co/sand-ai/MAGI-1"
        in err
    )
    assert f"{dl.SPECIAL_TOKENS_URL} to {tmp_path / 'dl' / 'special_tokens.npz'}" in err


def test_network_failure_gives_the_same_advice(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    from huggingface_hub.errors import LocalEntryNotFoundError

    def no_connection(*args, **kwargs):
        raise LocalEntryNotFoundError("cannot reach huggingface.co and nothing is cached")

    monkeypatch.setattr("huggingface_hub.snapshot_download", no_connection)
    assert dl.main(["24B_base", "--dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(
        "error: cannot get 24B_base (cannot reach huggingface.co and nothing is cached); download ckpt/magi/24B_base/inference_weight/"
    )
    assert err.count("\n") == 1


def _fake_snapshot(repo_id, *, local_dir, allow_patterns):
    assert repo_id == "sand-ai/MAGI-1"
    for f in [f for f in REPO_FILES if any(fnmatch.fnmatch(f, p) for p in allow_patterns)]:
        (Path(local_dir) / f).parent.mkdir(parents=True, exist_ok=True)
        (Path(local_dir) / f).write_bytes(b"x")
    return str(local_dir)


def test_download_writes_a_checked_config(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    payload = b"fake special tokens"
    monkeypatch.setattr("huggingface_hub.snapshot_download", _fake_snapshot)
    monkeypatch.setattr(dl, "_fetch_bytes", lambda url: payload)
    monkeypatch.setattr(dl, "SPECIAL_TOKENS_SHA256", hashlib.sha256(payload).hexdigest())
    dest = tmp_path / "downloads"
    assert dl.main(["4.5B_distill_quant", "--dir", str(dest)]) == 0
    assert (dest / "special_tokens.npz").read_bytes() == payload
    cfg = load_config(dest / "4.5B_distill_quant_config.json")
    assert cfg.runtime.load == str((dest / "ckpt/magi/4.5B_distill_quant").resolve())
    assert cfg.runtime.t5_pretrained == str((dest / "ckpt/t5").resolve())
    assert cfg.engine.fp8_quant and cfg.engine.distill and cfg.runtime.cfg_number == 1
    assert "wrote " in capsys.readouterr().out

    # Offline rerun with everything in place works without touching the network.
    _no_network(monkeypatch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert dl.main(["4.5B_distill_quant", "--dir", str(dest)]) == 0


def test_special_tokens_hash_mismatch_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(dl, "_fetch_bytes", lambda url: b"tampered")
    with pytest.raises(dl.DownloadError, match="has sha256 .* expected b54bc664"):
        dl.fetch_special_tokens(tmp_path)
    assert not (tmp_path / "special_tokens.npz").exists()


def test_special_tokens_url_error_is_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.snapshot_download", _fake_snapshot)

    def unreachable(url):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(dl, "_fetch_bytes", unreachable)
    with pytest.raises(dl.DownloadError) as err:
        dl.download("4.5B_base", tmp_path)
    assert "\n" not in str(err.value) and "no route to host" in str(err.value)


def test_unknown_model_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        dl.main(["7B"])
    assert exit_.value.code == 2
    assert "invalid choice: '7B'" in capsys.readouterr().err
