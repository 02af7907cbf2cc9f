"""MAGI-1 configuration: frozen dataclasses read from the official JSON format, validated.

The official config file is one JSON object with exactly three sections, ``model_config``,
``runtime_config`` and ``engine_config`` (shared/spec/config_and_cli.md). Field names here are the
official ones, so an official file loads unchanged.

Differences from the official loader, all deliberate:

* A field missing from a section takes the dataclass default below (the official loader demands
  every field). Unknown sections and fields are rejected, naming the closest valid name.
* Types are checked (JSON ``true`` is not an integer here) and the combinations the official code
  mishandles are rejected up front with a one-line :class:`ConfigError` naming the file, the field
  and the fix (e.g. ``num_steps`` not divisible by ``window_size``, which officially yields no
  frames at all).
* ``model_config.model_name`` and ``engine_config.enable_cuda_graph`` are accepted and ignored,
  as they are officially.
* Checkpoint paths are checked separately by :func:`check_paths`, so a config can be loaded and
  validated without the weights. Relative paths are resolved against the working directory, as
  the official code does.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if typing.TYPE_CHECKING:
    import torch

# torch is imported lazily (inside functions) so that `python -m magi.infer` can report argument
# errors and a Ctrl-C during start-up as one line, before the slow torch import.
PARAMS_DTYPES = ("torch.bfloat16", "torch.float16", "torch.float32")
CP_STRATEGIES = ("none", "cp_ulysses", "cp_shuffle_overlap")
# Fields the official loader requires but never reads; magi accepts and ignores them too.
IGNORED_FIELDS = ("model_config.model_name", "engine_config.enable_cuda_graph")


class ConfigError(ValueError):
    """An invalid config: the message is one line naming the file, the field and the fix."""


class CheckpointNotFoundError(ConfigError, FileNotFoundError):
    """A checkpoint folder or file named by the config does not exist (``problems``: one text each)."""

    problems: tuple[str, ...] = ()
    where: str = "<config>"


@dataclass(frozen=True)
class ModelConfig:
    model_name: str = "videodit_ardf"  # label only, ignored
    num_layers: int = 34
    hidden_size: int = 3072
    ffn_hidden_size: int = 12288
    num_attention_heads: int = 24
    num_query_groups: int = 8
    kv_channels: int = 128
    layernorm_epsilon: float = 1e-6
    apply_layernorm_1p: bool = True
    x_rescale_factor: float = 1.0
    half_channel_vae: bool = False
    params_dtype: str = "torch.bfloat16"
    patch_size: int = 2
    t_patch_size: int = 1
    in_channels: int = 16
    out_channels: int = 16
    cond_hidden_ratio: float = 0.25
    caption_channels: int = 4096
    caption_max_length: int = 800
    xattn_cond_hidden_ratio: float = 1.0
    cond_gating_ratio: float = 1.0
    gated_linear_unit: bool = False

    @property
    def dtype(self) -> torch.dtype:
        """params_dtype as a torch dtype ("torch.bfloat16" -> torch.bfloat16)."""
        import torch

        return getattr(torch, self.params_dtype.removeprefix("torch."))


@dataclass(frozen=True)
class RuntimeConfig:
    cfg_number: int = 3
    cfg_t_range: tuple[float, ...] = (0.0, 0.0217, 0.1, 0.3, 0.999)
    prev_chunk_scales: tuple[float, ...] = (1.5, 1.5, 1.5, 1.0, 1.0)
    text_scales: tuple[float, ...] = (7.5, 7.5, 7.5, 0.0, 0.0)
    noise2clean_kvrange: tuple[int, ...] = (5, 4, 3, 2)
    clean_chunk_kvrange: int = 1
    clean_t: float = 0.9999
    seed: int = 1234
    num_frames: int = 96
    video_size_h: int = 720
    video_size_w: int = 720
    num_steps: int = 64
    window_size: int = 4
    fps: int = 24
    chunk_width: int = 6
    load: str | None = None
    t5_pretrained: str | None = None
    t5_device: str = "cpu"
    vae_pretrained: str | None = None
    scale_factor: float = 0.18215
    temporal_downsample_factor: int = 4


@dataclass(frozen=True)
class EngineConfig:
    distributed_backend: str = "nccl"
    distributed_timeout_minutes: int = 15
    pp_size: int = 1
    cp_size: int = 1
    cp_strategy: str = "none"
    ulysses_overlap_degree: int = 1
    fp8_quant: bool = False
    distill_nearly_clean_chunk_threshold: float = 0.3
    shortcut_mode: str = "8,16,16"
    distill: bool = False
    kv_offload: bool = False
    enable_cuda_graph: bool = False  # never read, officially or here

    @property
    def weight_subdir(self) -> str:
        """DiT weight folder inside `runtime_config.load` chosen by the engine flags."""
        return "inference_weight" + (".fp8" if self.fp8_quant else "") + (
            ".distill" if self.distill else ""
        )


@dataclass(frozen=True)
class MagiConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    source: str | None = None  # file the config was read from (for error messages)

    def replace(self, **sections: Any) -> MagiConfig:
        """Copy with whole sections replaced, e.g. cfg.replace(runtime=new_runtime); re-validated."""
        return validate(dataclasses.replace(self, **sections))


SECTIONS: dict[str, type] = {
    "model_config": ModelConfig,
    "runtime_config": RuntimeConfig,
    "engine_config": EngineConfig,
}


# ---------------------------------------------------------------------------------------------
# Reading: structure and types


def _where(source: str | None) -> str:
    return source if source else "<config>"


def _type_name(value: Any) -> str:
    return "bool" if isinstance(value, bool) else type(value).__name__


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    # Python's json reads NaN / Infinity literals; no config field means them.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _coerce(hint: Any, value: Any) -> tuple[bool, Any, str]:
    """(ok, converted value, expected-type phrase) for one field value against its type hint."""
    if hint is bool:
        return isinstance(value, bool), value, "true or false"
    if hint is int:
        return _is_int(value), value, "an integer (e.g. 4)"
    if hint is float:
        return _is_number(value), float(value) if _is_number(value) else value, "a finite number"
    if hint is str:
        return isinstance(value, str), value, "a string"
    if hint == (str | None):
        return value is None or isinstance(value, str), value, "a path string"
    item = typing.get_args(hint)[0]  # tuple[int, ...] / tuple[float, ...]
    check = _is_int if item is int else _is_number
    phrase = "a list of integers" if item is int else "a list of finite numbers"
    if not isinstance(value, list) or not all(check(v) for v in value):
        return False, value, phrase
    return True, tuple(item(v) for v in value), phrase


def _section(cls: type, name: str, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: '{name}' must be a JSON object of fields, got {_type_name(data)}")
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key not in hints:
            close = difflib.get_close_matches(key, list(hints), n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"valid fields: {', '.join(hints)}"
            raise ConfigError(f"{where}: unknown field '{name}.{key}'; {hint}")
        ok, converted, phrase = _coerce(hints[key], value)
        if not ok:
            raise ConfigError(
                f"{where}: '{name}.{key}' must be {phrase}, got {json.dumps(value)} "
                f"({_type_name(value)}); fix the value in the file"
            )
        values[key] = converted
    return cls(**values)


def config_from_dict(data: dict[str, Any], source: str | None = None) -> MagiConfig:
    """Build and validate a MagiConfig from the official three-section dict.

    Args:
        data: {"model_config": {...}, "runtime_config": {...}, "engine_config": {...}};
            missing fields take the dataclass defaults, unknown ones are an error.
        source: file name used in error messages.

    Raises:
        ConfigError: one line naming the file, the field and the fix.
    """
    where = _where(source)
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the config must be a JSON object with {', '.join(SECTIONS)}")
    for key in data:
        if key not in SECTIONS:
            close = difflib.get_close_matches(key, list(SECTIONS), n=1)
            hint = f"did you mean '{close[0]}'?" if close else "remove it"
            raise ConfigError(
                f"{where}: unknown section '{key}'; {hint} "
                f"(sections: {', '.join(SECTIONS)})"
            )
    missing = [name for name in SECTIONS if name not in data]
    if missing:
        raise ConfigError(
            f"{where}: missing section(s) {', '.join(missing)}; add them "
            f"(an empty object {{}} takes magi's defaults for every field)"
        )
    sections = [_section(cls, name, data[name], where) for name, cls in SECTIONS.items()]
    return validate(MagiConfig(*sections, source=source))


def load_config(path: str | Path) -> MagiConfig:
    """Read and validate an official-format JSON config file (checkpoint paths are not checked).

    Args:
        path: the JSON file.

    Raises:
        ConfigError: unreadable file, bad JSON, unknown/mistyped field or invalid combination.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the config file ({err.strerror}); check the path") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    return config_from_dict(data, source=str(path))


def config_to_dict(cfg: MagiConfig) -> dict[str, Any]:
    """The official three-section dict (lists for tuples), ready for json.dump."""

    def plain(section: Any) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(section).items()}

    return {
        "model_config": plain(cfg.model),
        "runtime_config": plain(cfg.runtime),
        "engine_config": plain(cfg.engine),
    }


def save_config(cfg: MagiConfig, path: str | Path) -> None:
    """Write cfg in the official JSON format (4-space indent, as the shipped files)."""
    Path(path).write_text(json.dumps(config_to_dict(cfg), indent=4) + "\n")


# ---------------------------------------------------------------------------------------------
# Validation: value ranges and cross-field rules

_POSITIVE_FIELDS = {
    "model_config": (
        "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
        "kv_channels", "patch_size", "t_patch_size", "in_channels", "out_channels",
        "caption_channels", "caption_max_length",
    ),
    "runtime_config": (
        "num_frames", "video_size_h", "video_size_w", "num_steps", "window_size", "fps",
        "chunk_width", "temporal_downsample_factor",
    ),
    "engine_config": ("pp_size", "cp_size", "distributed_timeout_minutes"),
}


def _fail(cfg: MagiConfig, message: str) -> typing.NoReturn:
    raise ConfigError(f"{_where(cfg.source)}: {message}")


def _check_positive(cfg: MagiConfig) -> None:
    sections = {"model_config": cfg.model, "runtime_config": cfg.runtime, "engine_config": cfg.engine}
    for name, fields in _POSITIVE_FIELDS.items():
        for key in fields:
            value = getattr(sections[name], key)
            if value < 1:
                _fail(cfg, f"'{name}.{key}' must be >= 1, got {value}; set a positive integer")


def _check_model(cfg: MagiConfig) -> None:
    m = cfg.model
    if m.params_dtype not in PARAMS_DTYPES:
        close = difflib.get_close_matches(m.params_dtype, list(PARAMS_DTYPES), n=1)
        fix = f"did you mean '{close[0]}'?" if close else f"use one of {', '.join(PARAMS_DTYPES)}"
        _fail(cfg, f"'model_config.params_dtype' is '{m.params_dtype}'; {fix}")
    if m.num_attention_heads % m.num_query_groups:
        _fail(
            cfg,
            f"'model_config.num_attention_heads' ({m.num_attention_heads}) must be divisible by "
            f"num_query_groups ({m.num_query_groups}) for grouped-query attention; fix one of them",
        )
    if m.cond_gating_ratio != 1.0:
        _fail(cfg, f"'model_config.cond_gating_ratio' must be 1.0 (the gates are D wide), got {m.cond_gating_ratio}")
    if m.layernorm_epsilon <= 0:
        _fail(cfg, f"'model_config.layernorm_epsilon' must be > 0, got {m.layernorm_epsilon}; the shipped value is 1e-06")


def _check_sampling(cfg: MagiConfig) -> None:
    r = cfg.runtime
    for key in ("video_size_h", "video_size_w"):
        size = getattr(r, key)
        if size % 16:
            _fail(
                cfg,
                f"'runtime_config.{key}' ({size}) must be a multiple of 16 (VAE 8x and DiT patch 2x); "
                f"use {max(16, size // 16 * 16)} or {(size // 16 + 1) * 16}",
            )
    if r.num_steps % r.window_size:
        _fail(
            cfg,
            f"'runtime_config.num_steps' ({r.num_steps}) must be divisible by window_size "
            f"({r.window_size}) (the official code would silently produce no frames); "
            f"use {max(r.window_size, r.num_steps // r.window_size * r.window_size)}",
        )
    kv = r.noise2clean_kvrange
    if kv and r.num_steps % len(kv):
        _fail(
            cfg,
            f"'runtime_config.num_steps' ({r.num_steps}) must be divisible by the length of "
            f"noise2clean_kvrange ({len(kv)}); change num_steps or the list",
        )
    if any(v < 1 for v in kv):
        _fail(cfg, f"'runtime_config.noise2clean_kvrange' entries must be >= 1, got {list(kv)}")
    if r.clean_chunk_kvrange != -1 and r.clean_chunk_kvrange < 1:
        _fail(cfg, f"'runtime_config.clean_chunk_kvrange' must be -1 or >= 1, got {r.clean_chunk_kvrange}")
    if not 0.0 < r.clean_t <= 1.0:
        _fail(cfg, f"'runtime_config.clean_t' must be in (0, 1], got {r.clean_t}; the shipped value is 0.9999")
    if not -(2**63) <= r.seed < 2**64:
        _fail(cfg, f"'runtime_config.seed' ({r.seed}) does not fit in 64 bits, as torch.manual_seed "
                   "needs; use a smaller seed")
    if r.scale_factor <= 0:
        _fail(cfg, f"'runtime_config.scale_factor' must be > 0, got {r.scale_factor}; the shipped value is 0.18215")
    import torch

    try:
        torch.device(r.t5_device)
    except RuntimeError:
        _fail(cfg, f"'runtime_config.t5_device' '{r.t5_device}' is not a device; use \"cpu\" or \"cuda\"")


def _check_guidance(cfg: MagiConfig) -> None:
    r, e = cfg.runtime, cfg.engine
    if r.cfg_number not in (1, 3):
        _fail(cfg, f"'runtime_config.cfg_number' must be 1 or 3, got {r.cfg_number}")
    single = e.distill or e.fp8_quant
    if single and r.cfg_number != 1:
        _fail(cfg, "'runtime_config.cfg_number' must be 1 for distill or fp8_quant models; set \"cfg_number\": 1")
    if not single and r.cfg_number != 3:
        _fail(cfg, "'runtime_config.cfg_number' must be 3 for base models (distill and fp8_quant false); set \"cfg_number\": 3")
    lengths = {k: len(getattr(r, k)) for k in ("cfg_t_range", "prev_chunk_scales", "text_scales")}
    if len(set(lengths.values())) != 1 or not lengths["cfg_t_range"]:
        shown = ", ".join(f"{k} has {n}" for k, n in lengths.items())
        _fail(cfg, f"'runtime_config' cfg lists must have the same non-zero length ({shown}); make them equal")
    if list(r.cfg_t_range) != sorted(r.cfg_t_range):
        _fail(cfg, f"'runtime_config.cfg_t_range' must be increasing, got {list(r.cfg_t_range)}")
    if not re.fullmatch(r"[1-9]\d*(,[1-9]\d*)*", e.shortcut_mode):
        _fail(cfg, f"'engine_config.shortcut_mode' must look like \"8,16,16\", got \"{e.shortcut_mode}\"")


def _check_parallel(cfg: MagiConfig) -> None:
    m, e = cfg.model, cfg.engine
    if e.cp_strategy not in CP_STRATEGIES:
        close = difflib.get_close_matches(e.cp_strategy, CP_STRATEGIES, n=1)
        fix = f"did you mean '{close[0]}'?" if close else f"use one of {', '.join(CP_STRATEGIES)}"
        _fail(cfg, f"'engine_config.cp_strategy' is '{e.cp_strategy}'; {fix}")
    if e.cp_strategy == "none" and e.cp_size != 1:
        _fail(cfg, f"'engine_config.cp_strategy' \"none\" needs cp_size 1 (got {e.cp_size}); use \"cp_ulysses\"")
    heads, groups, cp = m.num_attention_heads, m.num_query_groups, e.cp_size
    if heads % cp:
        _fail(cfg, f"'engine_config.cp_size' ({cp}) must divide num_attention_heads ({heads}); pick a divisor of {heads}")
    if groups % cp and cp % groups:
        _fail(
            cfg,
            f"'engine_config.cp_size' ({cp}) must divide num_query_groups ({groups}) or be a multiple "
            f"of it; pick a cp_size such as {groups}",
        )
    if m.num_layers % e.pp_size:
        _fail(cfg, f"'engine_config.pp_size' ({e.pp_size}) must divide num_layers ({m.num_layers}); pick a divisor of {m.num_layers}")
    if e.ulysses_overlap_degree == 0 or e.ulysses_overlap_degree < -1:
        _fail(cfg, f"'engine_config.ulysses_overlap_degree' must be -1 or >= 1, got {e.ulysses_overlap_degree}")


def validate(cfg: MagiConfig) -> MagiConfig:
    """Check value ranges and cross-field rules; return cfg unchanged.

    Raises:
        ConfigError: the first problem found, as one line naming the file, the field and the fix.
    """
    _check_positive(cfg)
    _check_model(cfg)
    _check_sampling(cfg)
    _check_guidance(cfg)
    _check_parallel(cfg)
    return cfg


def check_world_size(cfg: MagiConfig, world_size: int) -> None:
    """The number of processes must equal pp_size * cp_size (as the official code asserts).

    Raises:
        ConfigError: naming both numbers and how to launch.
    """
    need = cfg.engine.pp_size * cfg.engine.cp_size
    if world_size != need:
        _fail(
            cfg,
            f"pp_size * cp_size = {need} but {world_size} process(es) were started; launch with "
            f"`torchrun --nproc_per_node {need}` or change engine_config.pp_size / cp_size",
        )


# ---------------------------------------------------------------------------------------------
# Checkpoint paths


def _resolve(path: str, base_dir: Path | None) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else (base_dir or Path.cwd()) / p


def _dit_problem(cfg: MagiConfig, base_dir: Path | None) -> str | None:
    r, e = cfg.runtime, cfg.engine
    if r.load is None:
        return "'runtime_config.load' is not set; point it at the DiT checkpoint root"
    folder = _resolve(r.load, base_dir) / e.weight_subdir
    names = ("model.safetensors.index.json", "model.safetensors", "model.safetensors.zst")
    if not any((folder / n).is_file() for n in names):
        return (
            f"'runtime_config.load': no DiT weights in {folder} (expected model.safetensors or "
            f"model.safetensors.index.json; fp8_quant={str(e.fp8_quant).lower()} and "
            f"distill={str(e.distill).lower()} select '{e.weight_subdir}')"
        )
    return None


def _t5_problem(cfg: MagiConfig, base_dir: Path | None) -> str | None:
    if cfg.runtime.t5_pretrained is None:
        return "'runtime_config.t5_pretrained' is not set; point it at the folder holding t5-v1_1-xxl/"
    folder = _resolve(cfg.runtime.t5_pretrained, base_dir) / "t5-v1_1-xxl"
    if not (folder / "config.json").is_file():
        return f"'runtime_config.t5_pretrained': no T5 model in {folder} (expected config.json and weights)"
    return None


def _vae_problem(cfg: MagiConfig, base_dir: Path | None) -> str | None:
    if cfg.runtime.vae_pretrained is None:
        return "'runtime_config.vae_pretrained' is not set; point it at the VAE folder"
    folder = _resolve(cfg.runtime.vae_pretrained, base_dir)
    missing = [n for n in ("config.json", "diffusion_pytorch_model.safetensors") if not (folder / n).is_file()]
    if missing:
        return f"'runtime_config.vae_pretrained': {' and '.join(missing)} missing in {folder}"
    return None


def check_paths(cfg: MagiConfig, base_dir: str | Path | None = None) -> None:
    """Check that the DiT, T5 and VAE checkpoints the config names exist.

    Args:
        cfg: a loaded config.
        base_dir: folder that relative paths are resolved against; default the working directory
            (as the official code does).

    Raises:
        CheckpointNotFoundError: one line listing every missing part and how to get the weights.
    """
    base = Path(base_dir) if base_dir is not None else None
    problems = [p for p in (_dit_problem(cfg, base), _t5_problem(cfg, base), _vae_problem(cfg, base)) if p]
    if problems:
        err = CheckpointNotFoundError(
            f"{_where(cfg.source)}: {'; '.join(problems)}. Relative paths are resolved against the "
            f"working directory ({base or Path.cwd()}); get the official weights with "
            f"`python -m magi.download <model> --dir downloads/` or fix the paths"
        )
        err.problems, err.where = tuple(problems), _where(cfg.source)
        raise err


# ---------------------------------------------------------------------------------------------
# Named presets: the six shipped official configs (values from shared/spec/config_and_cli.md §1)

_MODEL_4P5B: dict[str, Any] = {
    "model_name": "videodit_ardf", "num_layers": 34, "hidden_size": 3072, "ffn_hidden_size": 12288,
    "num_attention_heads": 24, "num_query_groups": 8, "kv_channels": 128, "layernorm_epsilon": 1e-06,
    "apply_layernorm_1p": True, "x_rescale_factor": 1, "half_channel_vae": False,
    "params_dtype": "torch.bfloat16", "patch_size": 2, "t_patch_size": 1, "in_channels": 16,
    "out_channels": 16, "cond_hidden_ratio": 0.25, "caption_channels": 4096,
    "caption_max_length": 800, "xattn_cond_hidden_ratio": 1.0, "cond_gating_ratio": 1.0,
    "gated_linear_unit": False,
}
_MODEL_24B: dict[str, Any] = {
    **_MODEL_4P5B, "num_layers": 48, "hidden_size": 6144, "ffn_hidden_size": 16384,
    "num_attention_heads": 48, "x_rescale_factor": 0.1, "half_channel_vae": True,
    "in_channels": 32, "out_channels": 32, "gated_linear_unit": True,
}
_RUNTIME: dict[str, Any] = {
    "cfg_number": 3, "cfg_t_range": [0.0, 0.0217, 0.1, 0.3, 0.999],
    "prev_chunk_scales": [1.5, 1.5, 1.5, 1.0, 1.0], "text_scales": [7.5, 7.5, 7.5, 0.0, 0.0],
    "noise2clean_kvrange": [5, 4, 3, 2], "clean_chunk_kvrange": 1, "clean_t": 0.9999,
    "seed": 1234, "num_frames": 96, "video_size_h": 720, "video_size_w": 720, "num_steps": 64,
    "window_size": 4, "fps": 24, "chunk_width": 6, "load": None,
    "t5_pretrained": "./downloads/t5_pretrained", "t5_device": "cpu",
    "vae_pretrained": "./downloads/vae", "scale_factor": 0.18215, "temporal_downsample_factor": 4,
}
_ENGINE: dict[str, Any] = {
    "distributed_backend": "nccl", "distributed_timeout_minutes": 15, "pp_size": 1, "cp_size": 1,
    "cp_strategy": "cp_ulysses", "ulysses_overlap_degree": 1, "fp8_quant": False,
    "distill_nearly_clean_chunk_threshold": 0.3, "shortcut_mode": "8,16,16", "distill": False,
    "kv_offload": True, "enable_cuda_graph": False,
}
_VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # variant -> (runtime overrides, engine overrides)
    "base": ({}, {}),
    "distill": ({"cfg_number": 1}, {"distill": True}),
    "distill_quant": ({"cfg_number": 1}, {"distill": True, "fp8_quant": True}),
}
PRESET_NAMES = tuple(f"{size}_{v}" for size in ("4.5B", "24B") for v in _VARIANTS)


def preset_dict(name: str) -> dict[str, Any]:
    """The shipped official config `name` (e.g. "24B_distill") as the official JSON dict.

    Raises:
        ConfigError: unknown name (lists the valid ones).
    """
    if name not in PRESET_NAMES:
        raise ConfigError(f"unknown model '{name}'; choose one of {', '.join(PRESET_NAMES)}")
    size, variant = name.split("_", 1)
    runtime_over, engine_over = _VARIANTS[variant]
    runtime = {**_RUNTIME, **runtime_over, "load": f"./downloads/{name}"}
    engine = {**_ENGINE, **engine_over}
    if size == "24B":
        runtime.update(video_size_w=1280, t5_device="cuda", num_steps=32 if variant == "base" else 16)
        engine.update(cp_size=8)
    model = _MODEL_24B if size == "24B" else _MODEL_4P5B
    return copy.deepcopy({"model_config": model, "runtime_config": runtime, "engine_config": engine})


def preset(name: str) -> MagiConfig:
    """The shipped official config `name` as a validated MagiConfig."""
    return config_from_dict(preset_dict(name), source=f"preset {name}")
