"""Config loading and validation: shipped configs load unchanged; every rule fails with one line."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from magi.config import (
    PRESET_NAMES,
    CheckpointNotFoundError,
    ConfigError,
    MagiConfig,
    RuntimeConfig,
    check_paths,
    check_world_size,
    config_from_dict,
    config_to_dict,
    load_config,
    preset,
    preset_dict,
    save_config,
)
from tests.helpers import REPO_ROOT as REPO, TINY_CONFIG

EXAMPLE_CONFIGS = sorted(REPO.glob("example/*/*_config.json"))


def test_all_six_official_configs_ship_and_load():
    names = sorted(p.name for p in EXAMPLE_CONFIGS)
    assert names == sorted(f"{n}_config.json" for n in PRESET_NAMES)
    for path in EXAMPLE_CONFIGS:
        cfg = load_config(path)
        assert cfg.source == str(path)
        # The file is exactly the named preset (official values, official key order).
        name = path.name.removesuffix("_config.json")
        assert json.loads(path.read_text()) == preset_dict(name)
        assert list(json.loads(path.read_text())["runtime_config"]) == list(preset_dict(name)["runtime_config"])


@pytest.mark.parametrize(
    "name, steps, subdir, cp, cfg_number",
    [
        ("4.5B_base", 64, "inference_weight", 1, 3),
        ("4.5B_distill", 64, "inference_weight.distill", 1, 1),
        ("4.5B_distill_quant", 64, "inference_weight.fp8.distill", 1, 1),
        ("24B_base", 32, "inference_weight", 8, 3),
        ("24B_distill", 16, "inference_weight.distill", 8, 1),
        ("24B_distill_quant", 16, "inference_weight.fp8.distill", 8, 1),
    ],
)
def test_shipped_values(name, steps, subdir, cp, cfg_number):
    cfg = load_config(REPO / "example" / name.split("_")[0] / f"{name}_config.json")
    assert cfg.runtime.num_steps == steps
    assert cfg.engine.weight_subdir == subdir
    assert cfg.engine.cp_size == cp
    assert cfg.runtime.cfg_number == cfg_number
    assert cfg.runtime.load == f"./downloads/{name}"
    assert cfg.model.dtype is torch.bfloat16
    is_24b = name.startswith("24B")
    assert (cfg.model.num_layers, cfg.model.hidden_size) == ((48, 6144) if is_24b else (34, 3072))
    assert cfg.model.x_rescale_factor == (0.1 if is_24b else 1.0)
    assert cfg.model.half_channel_vae is is_24b and cfg.model.gated_linear_unit is is_24b
    assert (cfg.runtime.video_size_h, cfg.runtime.video_size_w) == ((720, 1280) if is_24b else (720, 720))
    assert cfg.runtime.t5_device == ("cuda" if is_24b else "cpu")


def test_reference_tiny_configs_load(reference_dir):
    for path in sorted((reference_dir / "configs").glob("*.json")):
        cfg = load_config(path)
        assert cfg.model.dtype is torch.float32 or cfg.engine.fp8_quant


def test_missing_fields_take_defaults_and_lists_become_tuples():
    cfg = config_from_dict({"model_config": {"num_layers": 2}, "runtime_config": {}, "engine_config": {}})
    assert cfg.model.num_layers == 2
    assert cfg.model.hidden_size == 3072  # default
    assert cfg.runtime == RuntimeConfig()
    full = config_from_dict(preset_dict("4.5B_base"))
    assert full.runtime.noise2clean_kvrange == (5, 4, 3, 2)
    assert isinstance(full.model.x_rescale_factor, float)  # JSON 1 -> 1.0


def test_ignored_fields_are_accepted():
    data = preset_dict("4.5B_base")
    data["model_config"]["model_name"] = "anything"
    data["engine_config"]["enable_cuda_graph"] = True
    assert config_from_dict(data).model.model_name == "anything"


def test_round_trip_and_replace(tmp_path):
    cfg = preset("24B_distill")
    save_config(cfg, tmp_path / "c.json")
    again = load_config(tmp_path / "c.json")
    assert config_to_dict(again) == config_to_dict(cfg)
    import dataclasses

    seeded = cfg.replace(runtime=dataclasses.replace(cfg.runtime, seed=7))
    assert seeded.runtime.seed == 7 and seeded.model == cfg.model
    with pytest.raises(ConfigError, match="num_steps' \\(10\\) must be divisible by window_size"):
        cfg.replace(runtime=dataclasses.replace(cfg.runtime, num_steps=10))


def _mutated(path: str, value) -> dict:
    data = copy.deepcopy(preset_dict("4.5B_base"))
    section, key = path.split(".")
    if value is _DELETE:
        del data[section][key]
    else:
        data[section][key] = value
    return data


_DELETE = object()

# (section.field, value, expected message fragment)
RULES = [
    ("model_config.hiden_size", 3072, "unknown field 'model_config.hiden_size'; did you mean 'hidden_size'?"),
    ("runtime_config.num_step", 8, "unknown field 'runtime_config.num_step'; did you mean 'num_steps'?"),
    ("model_config.num_layers", True, "'model_config.num_layers' must be an integer (e.g. 4), got true (bool)"),
    ("model_config.num_layers", 3.5, "'model_config.num_layers' must be an integer (e.g. 4), got 3.5 (float)"),
    ("engine_config.distill", 1, "'engine_config.distill' must be true or false, got 1 (int)"),
    ("model_config.layernorm_epsilon", "1e-6", "'model_config.layernorm_epsilon' must be a finite number"),
    ("runtime_config.noise2clean_kvrange", [5, 4.5], "'runtime_config.noise2clean_kvrange' must be a list of integers"),
    ("runtime_config.text_scales", "7.5", "'runtime_config.text_scales' must be a list of finite numbers"),
    ("runtime_config.load", 3, "'runtime_config.load' must be a path string"),
    ("runtime_config.video_size_h", 100, "'runtime_config.video_size_h' (100) must be a multiple of 16"),
    ("runtime_config.video_size_w", 721, "use 720 or 736"),
    (
        "runtime_config.num_steps",
        30,
        "'runtime_config.num_steps' (30) must be divisible by window_size (4) (the official code would silently produce no frames); use 28",
    ),
    ("runtime_config.noise2clean_kvrange", [5, 4, 3], "must be divisible by the length of noise2clean_kvrange (3)"),
    ("runtime_config.window_size", 0, "'runtime_config.window_size' must be >= 1, got 0"),
    ("runtime_config.chunk_width", 0, "'runtime_config.chunk_width' must be >= 1, got 0"),
    ("model_config.num_layers", -1, "'model_config.num_layers' must be >= 1, got -1"),
    ("runtime_config.cfg_number", 2, "'runtime_config.cfg_number' must be 1 or 3, got 2"),
    ("runtime_config.cfg_number", 1, "must be 3 for base models"),
    ("engine_config.distill", True, "must be 1 for distill or fp8_quant models"),
    ("engine_config.fp8_quant", True, "must be 1 for distill or fp8_quant models"),
    (
        "runtime_config.text_scales",
        [7.5, 0.0],
        "cfg lists must have the same non-zero length (cfg_t_range has 5, prev_chunk_scales has 5, text_scales has 2)",
    ),
    ("runtime_config.cfg_t_range", [0.3, 0.1, 0.0, 0.5, 0.9], "'runtime_config.cfg_t_range' must be increasing"),
    ("engine_config.cp_size", 16, "'engine_config.cp_size' (16) must divide num_attention_heads (24)"),
    (
        "engine_config.cp_size",
        12,
        "'engine_config.cp_size' (12) must divide num_query_groups (8) or be a multiple of it",
    ),
    ("engine_config.pp_size", 4, "'engine_config.pp_size' (4) must divide num_layers (34)"),
    (
        "engine_config.cp_strategy",
        "cp_ulyses",
        "'engine_config.cp_strategy' is 'cp_ulyses'; did you mean 'cp_ulysses'?",
    ),
    ("engine_config.ulysses_overlap_degree", 0, "'engine_config.ulysses_overlap_degree' must be -1 or >= 1"),
    (
        "model_config.params_dtype",
        "torch.bfloat",
        "'model_config.params_dtype' is 'torch.bfloat'; did you mean 'torch.bfloat16'?",
    ),
    ("model_config.params_dtype", "fp8", "use one of torch.bfloat16, torch.float16, torch.float32"),
    ("model_config.num_query_groups", 5, "num_attention_heads' (24) must be divisible by num_query_groups (5)"),
    ("model_config.cond_gating_ratio", 0.5, "'model_config.cond_gating_ratio' must be 1.0"),
    ("model_config.layernorm_epsilon", 0, "'model_config.layernorm_epsilon' must be > 0"),
    ("runtime_config.clean_t", 1.5, "'runtime_config.clean_t' must be in (0, 1]"),
    ("runtime_config.clean_chunk_kvrange", 0, "'runtime_config.clean_chunk_kvrange' must be -1 or >= 1"),
    ("runtime_config.noise2clean_kvrange", [5, 4, 0, 2], "noise2clean_kvrange' entries must be >= 1"),
    ("runtime_config.scale_factor", 0, "'runtime_config.scale_factor' must be > 0"),
    ("runtime_config.t5_device", "gpu0", "'runtime_config.t5_device' 'gpu0' is not a device"),
    ("engine_config.shortcut_mode", "8-16-16", "'engine_config.shortcut_mode' must look like \"8,16,16\""),
]


@pytest.mark.parametrize("field, value, message", RULES, ids=[f"{r[0]}={r[1]!r}" for r in RULES])
def test_each_rule_fails_with_one_line_naming_file_and_field(tmp_path, field, value, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(_mutated(field, value)))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    assert text.startswith(f"{path}: "), text
    assert message in text, text
    assert "\n" not in text


def test_cp_none_needs_cp_size_1():
    data = _mutated("engine_config.cp_strategy", "none")
    data["engine_config"]["cp_size"] = 2
    with pytest.raises(ConfigError, match='"none" needs cp_size 1 \\(got 2\\)'):
        config_from_dict(data)


def test_cp_multiple_of_groups_is_accepted():
    data = _mutated("engine_config.cp_size", 24)  # 24 heads, 8 groups: cp 24 repeats K/V heads
    assert config_from_dict(data).engine.cp_size == 24


def test_structure_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"<config>: missing section\(s\) engine_config"):
        config_from_dict({"model_config": {}, "runtime_config": {}})
    with pytest.raises(ConfigError, match="unknown section 'runtime'; did you mean 'runtime_config'"):
        config_from_dict({"model_config": {}, "runtime": {}, "engine_config": {}})
    with pytest.raises(ConfigError, match="'model_config' must be a JSON object of fields, got list"):
        config_from_dict({"model_config": [], "runtime_config": {}, "engine_config": {}})
    bad = tmp_path / "broken.json"
    bad.write_text('{"model_config": {,}')
    with pytest.raises(ConfigError, match=r"broken.json: invalid JSON at line 1 column 19"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(tmp_path / "absent.json")


def test_world_size_rule():
    cfg = preset("24B_base")
    check_world_size(cfg, 8)
    with pytest.raises(ConfigError, match=r"pp_size \* cp_size = 8 but 2 process\(es\) were started"):
        check_world_size(cfg, 2)


def _fake_checkpoints(root: Path, subdir: str) -> None:
    (root / "dit" / subdir).mkdir(parents=True)
    (root / "dit" / subdir / "model.safetensors").write_bytes(b"x")
    (root / "t5" / "t5-v1_1-xxl").mkdir(parents=True)
    (root / "t5" / "t5-v1_1-xxl" / "config.json").write_text("{}")
    (root / "vae").mkdir()
    (root / "vae" / "config.json").write_text("{}")
    (root / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"x")


def test_check_paths_resolves_against_working_directory(tmp_path, monkeypatch):
    data = preset_dict("4.5B_distill")
    data["runtime_config"].update(load="ck/dit", t5_pretrained="ck/t5", vae_pretrained="ck/vae")
    cfg = config_from_dict(data, source="my.json")
    with pytest.raises(CheckpointNotFoundError) as err:
        check_paths(cfg, base_dir=tmp_path)
    text = str(err.value)
    assert isinstance(err.value, FileNotFoundError) and "\n" not in text
    assert text.startswith("my.json: 'runtime_config.load': no DiT weights in")
    assert "select 'inference_weight.distill'" in text
    assert "'runtime_config.t5_pretrained': no T5 model in" in text
    assert "config.json and diffusion_pytorch_model.safetensors missing" in text
    assert "python -m magi.download" in text

    _fake_checkpoints(tmp_path / "ck", "inference_weight.distill")
    check_paths(cfg, base_dir=tmp_path)
    monkeypatch.chdir(tmp_path)
    check_paths(cfg)  # relative to the working directory, as officially


def test_check_paths_unset_paths():
    cfg = MagiConfig()
    with pytest.raises(CheckpointNotFoundError, match="'runtime_config.load' is not set"):
        check_paths(cfg)


def test_dtype_property():
    data = _mutated("model_config.params_dtype", "torch.float16")
    assert config_from_dict(data).model.dtype is torch.float16


# ------------------------------------- values that used to pass validation and fail deep inside torch
def _write(tmp_path: Path, section: str, key: str, value: object) -> Path:
    raw = json.loads(TINY_CONFIG.read_text())
    raw[section][key] = value
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))  # json writes NaN / Infinity literals, as a hand edit could
    return path


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        (
            "runtime_config",
            "scale_factor",
            float("inf"),
            "'runtime_config.scale_factor' must be a finite number, got Infinity",
        ),
        ("runtime_config", "clean_t", float("nan"), "'runtime_config.clean_t' must be a finite number, got NaN"),
        (
            "runtime_config",
            "cfg_t_range",
            [0.0, float("nan")],
            "'runtime_config.cfg_t_range' must be a list of finite numbers",
        ),
        (
            "model_config",
            "layernorm_epsilon",
            float("-inf"),
            "'model_config.layernorm_epsilon' must be a finite number",
        ),
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

    status = main(
        [
            "--config",
            str(TINY_CONFIG),
            "--mode",
            "t2v",
            "--prompt",
            "a cat",
            "--seed",
            str(2**70),
            "--output_path",
            str(tmp_path / "out.mp4"),
            "--device",
            "cpu",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "does not fit in 64 bits" in err[0]
