"""Load the official DiT checkpoint: meta-device build, streamed shards, strict key check.

Layout (shared/spec/config_and_cli.md §3): ``<runtime.load>/inference_weight[.fp8][.distill]/``
holds ``model.safetensors.index.json`` (``weight_map``: key -> shard file) and its shards, or a
single ``model.safetensors``. A ``<shard>.zst`` next to a shard's path takes precedence and is
decompressed with the ``zstd`` command-line tool. Keys are the DiT's parameter names; nothing is
renamed except the layer index of a pipeline stage (global -> local).

The start-up check (:func:`check_dit_checkpoint`) builds nothing: the expected keys and shapes come
from :func:`dit_manifest`, a pure function of the config, compared with the safetensors headers.
MAGI-1.1 checkpoints (layers stacked as ``videodit_blocks.layers.<name>``) are refused from the
keys alone, before any tensor is read.

The model is built on the meta device (no memory, no init), the fp8 swap is applied when
``engine.fp8_quant``, each needed tensor is read from its memory-mapped shard straight to its final
device and dtype (the official construction dtypes with the promoted modules in float32), and the
state dict is assigned. Unlike the official loader this one is strict: missing, unexpected or
mis-shaped keys raise one error listing them with the likely cause. Files are never unpickled.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path, PureWindowsPath

import torch
from safetensors import SafetensorError, safe_open

from magi.config import MagiConfig, ModelConfig
from magi.fp8 import FP8, PER_CHANNEL_NAMES, PER_TENSOR_NAMES, is_fp8_layer, swap_fp8_linears
from magi.models.dit import FREQ_EMBED_DIM, DiT

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_LAYER_KEY = re.compile(r"^videodit_blocks\.layers\.(\d+)\.(.+)$")
# MAGI-1.1 stacks its layers: ``videodit_blocks.layers.<name>`` with a leading layer dimension.
_STACKED_KEY = re.compile(r"^videodit_blocks\.layers\.(?!\d+\.)[^.]")
_FP8_SUFFIXES = (".weight_scale", ".input_scale", ".smooth_scale")
_MAX_LISTED = 8


def weight_folder(cfg: MagiConfig) -> Path:
    """``<load>/inference_weight`` + ``.fp8`` if fp8_quant + ``.distill`` if distill."""
    if not cfg.runtime.load:
        raise ValueError("runtime_config.load is not set: point it at the DiT checkpoint root")
    suffix = (".fp8" if cfg.engine.fp8_quant else "") + (".distill" if cfg.engine.distill else "")
    return Path(cfg.runtime.load) / f"inference_weight{suffix}"


Manifest = dict[str, tuple[tuple[int, ...], torch.dtype]]  # key -> (shape, dtype), state_dict order


def load_dit(cfg: MagiConfig, device: torch.device | str, *, layers: Sequence[int] | None = None) -> DiT:
    """Build the DiT of ``cfg`` and load its official checkpoint.

    Args:
        cfg: full config (model architecture, ``runtime.load``, ``engine.fp8_quant`` / ``distill``).
        device: where the parameters are materialised.
        layers: global indices of the layers to build and load (one pipeline stage), renumbered
            0.. locally; None loads all ``num_layers``.

    Returns:
        The model in eval mode, parameters on ``device``, promoted modules in float32.
    """
    layer_numbers = _check_layers(layers, cfg.model.num_layers)
    model = _meta_model(cfg, layer_numbers)  # the one meta build of a start
    expected = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    with _Shards(weight_folder(cfg)) as shards:
        key_to_shard = shards.layout()
        _refuse_stacked(shards, key_to_shard)
        wanted = _match_keys(cfg, shards.folder, key_to_shard, expected, layer_numbers)
        state = _read_tensors(cfg, shards, key_to_shard, wanted, expected, torch.device(device))
    model.load_state_dict(state, strict=True, assign=True)
    return model.requires_grad_(False).eval()


def check_dit_checkpoint(cfg: MagiConfig, *, layers: Sequence[int] | None = None) -> Path:
    """Start-up check of the DiT checkpoint without reading any weights (headers only; seconds).

    Finds the same faults as :func:`load_dit` would after minutes of loading: missing folder,
    damaged index or shard names outside the folder, a MAGI-1.1 (stacked-layer) checkpoint,
    missing / unexpected / mis-shaped keys, keys the index places in a shard that lacks them,
    non-floating tensors. Builds no model: the expected keys come from :func:`dit_manifest`.
    zstd-compressed shards are not decompressed here (their headers are checked by the load).

    Args:
        cfg: full config, as for :func:`load_dit`.
        layers: the pipeline stage's global layer indices; None checks all layers.

    Returns:
        The checked weight folder.
    """
    layer_numbers = _check_layers(layers, cfg.model.num_layers)
    expected = dit_manifest(cfg.model, fp8=cfg.engine.fp8_quant, layer_numbers=layer_numbers)
    with _Shards(weight_folder(cfg)) as shards:
        key_to_shard = shards.layout()
        _refuse_stacked(shards, key_to_shard)
        wanted = _match_keys(cfg, shards.folder, key_to_shard, expected, layer_numbers)
        by_shard: dict[str, dict[str, str]] = defaultdict(dict)
        for key, ckpt_key in wanted.items():
            by_shard[key_to_shard[ckpt_key]][key] = ckpt_key
        mis_shaped: list[str] = []
        for shard, keys in sorted(by_shard.items()):
            if (shards.folder / f"{shard}.zst").is_file():
                continue  # would need a full decompression
            with shards.open(shard) as f:
                mis_shaped += _check_header(shards, shard, f, keys, expected)
        if mis_shaped:
            raise ValueError(_mismatch_message(cfg, shards.folder, key_to_shard, [], [], mis_shaped))
        return shards.folder


def dit_manifest(model: ModelConfig, *, fp8: bool = False, layer_numbers: Sequence[int] | None = None) -> Manifest:
    """Every tensor :func:`load_dit` expects, as key -> (shape, dtype), without building the DiT.

    The dtypes are those of the built model (promoted modules float32, fp8 weights e4m3 with
    float32 scales); the order is ``DiT.state_dict()``'s. Layers are numbered locally 0.. and
    quantised by their global number, as in :func:`load_dit`.

    Args:
        model: the architecture (official ``model_config``).
        fp8: ``engine_config.fp8_quant``.
        layer_numbers: global indices of the layers (one pipeline stage); None: all layers.
    """
    f32, h = torch.float32, model.hidden_size
    cond, xattn = int(h * model.cond_hidden_ratio), int(h * model.xattn_cond_hidden_ratio)
    ps, tps = model.patch_size, model.t_patch_size
    out: Manifest = {"x_embedder.weight": ((h, model.in_channels, tps, ps, ps), f32)}
    out |= _linear("t_embedder.mlp.0", cond, FREQ_EMBED_DIM, f32, bias=True)  # mlp.1 is the SiLU
    out |= _linear("t_embedder.mlp.2", cond, cond, f32, bias=True)
    out["y_embedder.null_caption_embedding"] = ((model.caption_max_length, model.caption_channels), f32)
    out |= _linear("y_embedder.y_proj_xattn.0", xattn, model.caption_channels, f32, bias=True)
    out |= _linear("y_embedder.y_proj_adaln.0", cond, model.caption_channels, f32, bias=True)
    out["rope.bands"] = ((model.kv_channels // 8,), f32)
    numbers = list(range(model.num_layers)) if layer_numbers is None else list(layer_numbers)
    for local, number in enumerate(numbers):
        quantised = fp8 and is_fp8_layer(number, model.num_layers)
        out |= _layer_manifest(model, f"videodit_blocks.layers.{local}", quantised)
    out |= _norm("videodit_blocks.final_layernorm", h, f32)
    out["final_linear.linear.weight"] = ((ps * ps * tps * model.out_channels, h), f32)
    return out


def _layer_manifest(model: ModelConfig, prefix: str, quantised: bool) -> Manifest:
    """One TransformerLayer's tensors (state_dict order), fp8 linears when ``quantised``."""
    f32, dt, h, hd = torch.float32, model.dtype, model.hidden_size, model.kv_channels
    q, kv = model.num_attention_heads * hd, model.num_query_groups * hd
    ffn = model.ffn_hidden_size
    cond, gate = int(h * model.cond_hidden_ratio), int(h * model.cond_gating_ratio)
    xattn = int(h * model.xattn_cond_hidden_ratio)
    linears = {  # name -> (out, in) of the bias-free params_dtype linears
        "self_attention.linear_qkv.q": (q, h),
        "self_attention.linear_qkv.qx": (q, h),
        "self_attention.linear_qkv.k": (kv, h),
        "self_attention.linear_qkv.v": (kv, h),
        "self_attention.linear_kv_xattn": (2 * kv, xattn),
        "self_attention.linear_proj": (h, 2 * q),
        "mlp.linear_fc1": (2 * ffn if model.gated_linear_unit else ffn, h),
        "mlp.linear_fc2": (h, ffn),
    }

    def lin(name: str) -> Manifest:
        rows, cols = linears[name]
        if quantised and name in PER_TENSOR_NAMES + PER_CHANNEL_NAMES:
            return _fp8_linear(f"{prefix}.{name}", rows, cols, per_channel=name in PER_CHANNEL_NAMES)
        return _linear(f"{prefix}.{name}", rows, cols, dt, bias=False)

    out = _linear(f"{prefix}.ada_modulate_layer.proj.0", 2 * gate, cond, dt, bias=True)
    out |= _norm(f"{prefix}.self_attention.linear_qkv.layer_norm", h, dt)
    for name in list(linears)[:6]:
        out |= lin(name)
    for norm, dtype in (
        ("q_layernorm", f32),
        ("q_layernorm_xattn", dt),
        ("k_layernorm", f32),
        ("k_layernorm_xattn", dt),
    ):
        out |= _norm(f"{prefix}.self_attention.{norm}", hd, dtype)
    out |= _norm(f"{prefix}.self_attn_post_norm", h, f32) | _norm(f"{prefix}.mlp.layer_norm", h, dt)
    out |= lin("mlp.linear_fc1") | lin("mlp.linear_fc2")
    return out | _norm(f"{prefix}.mlp_post_norm", h, f32)


def _linear(prefix: str, rows: int, cols: int, dtype: torch.dtype, *, bias: bool) -> Manifest:
    out: Manifest = {f"{prefix}.weight": ((rows, cols), dtype)}
    return out | ({f"{prefix}.bias": ((rows,), dtype)} if bias else {})


def _norm(prefix: str, dim: int, dtype: torch.dtype) -> Manifest:
    return {f"{prefix}.weight": ((dim,), dtype), f"{prefix}.bias": ((dim,), dtype)}


def _fp8_linear(prefix: str, rows: int, cols: int, *, per_channel: bool) -> Manifest:
    """magi.fp8's storage: weight [1, O, K] e4m3, weight_scale [1], input_scale [K] or [1]
    (+ smooth_scale [1, K] per channel), scales float32."""
    f32 = torch.float32
    out: Manifest = {f"{prefix}.weight": ((1, rows, cols), FP8), f"{prefix}.weight_scale": ((1,), f32)}
    if not per_channel:
        return out | {f"{prefix}.input_scale": ((cols,), f32)}
    return out | {f"{prefix}.input_scale": ((1,), f32), f"{prefix}.smooth_scale": ((1, cols), f32)}


def _refuse_stacked(shards: _Shards, key_to_shard: dict[str, str]) -> None:
    """Refuse a MAGI-1.1 checkpoint (``videodit_blocks.layers.<name>`` tensors with a leading
    layer dimension) from its keys, before any tensor is read: its fused projections' packing is
    not public, so loading it as MAGI-1 would give garbage weights."""
    stacked = sorted(k for k in key_to_shard if _STACKED_KEY.match(k))
    if not stacked:
        return
    layers = ""
    shard = key_to_shard[stacked[0]]
    if not (shards.folder / f"{shard}.zst").is_file():  # a header read only; never decompress here
        with shards.open(shard) as f:
            shape = f.get_slice(stacked[0]).get_shape()
        layers = f", {shape[0]} layers" if shape else ""
    where = f"{shards.folder.parent.name}/{shards.folder.name}"  # short: the message stays one line
    raise ValueError(
        f"{where} is a MAGI-1.1 checkpoint ({len(stacked)} stacked videodit_blocks.layers.<name> "
        f"tensors{layers}); MAGI-1.1 is not supported yet: use MAGI-1 (v1.0) weights"
    )


def _meta_model(cfg: MagiConfig, layer_numbers: list[int]) -> DiT:
    """The DiT as it will be loaded (fp8 swap, promoted modules), on the meta device."""
    with torch.device("meta"):
        model = DiT(cfg.model, layer_numbers=layer_numbers)
        if cfg.engine.fp8_quant:
            swap_fp8_linears(model, cfg.model.num_layers)
        model.promote_precision()
    return model


def _check_layers(layers: Sequence[int] | None, num_layers: int) -> list[int]:
    numbers = list(range(num_layers)) if layers is None else [int(i) for i in layers]
    bad = [i for i in numbers if not 0 <= i < num_layers]
    if bad or len(set(numbers)) != len(numbers):
        raise ValueError(f"layers must be distinct indices in [0, {num_layers}), got {list(layers or [])}")
    return numbers


class _Shards:
    """The checkpoint folder's files; zstd-compressed shards are decompressed once, to a
    temporary folder removed when the load ends."""

    def __init__(self, folder: Path) -> None:
        if not folder.is_dir():
            raise FileNotFoundError(
                f"DiT checkpoint folder {folder} does not exist (check runtime_config.load and the fp8/distill flags)"
            )
        if not any(folder.iterdir()):
            raise FileNotFoundError(f"DiT checkpoint folder {folder} is empty (download the weights first)")
        self.folder = folder
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._unpacked: dict[str, Path] = {}

    def __enter__(self) -> _Shards:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()

    def layout(self) -> dict[str, str]:
        """key -> shard file name, from the index json or the single-file checkpoint."""
        index = self.folder / INDEX_FILE
        if index.is_file():
            return _parse_index(index)
        if not (self.folder / SINGLE_FILE).is_file() and not (self.folder / f"{SINGLE_FILE}.zst").is_file():
            raise FileNotFoundError(f"{self.folder} has neither {INDEX_FILE} nor {SINGLE_FILE}")
        with self.open(SINGLE_FILE) as f:
            return {k: SINGLE_FILE for k in f.keys()}

    def open(self, shard: str):  # -> safetensors safe_open handle (memory-mapped)
        path = self.path(shard)
        try:
            return safe_open(str(path), framework="pt")
        except SafetensorError as err:  # truncated download, or not a safetensors file
            raise ValueError(
                f"{path} is not a readable safetensors file ({err}); it is truncated or corrupt: download it again"
            ) from None

    def path(self, shard: str) -> Path:
        """Readable path of a shard; a ``<shard>.zst`` next to it wins and is decompressed."""
        path, packed = self.folder / shard, self.folder / f"{shard}.zst"
        if not packed.is_file():
            if not path.is_file():
                raise FileNotFoundError(f"shard {path} listed in the checkpoint index does not exist")
            return path
        if shard not in self._unpacked:
            self._unpacked[shard] = self._decompress(packed, shard)
        return self._unpacked[shard]

    def _decompress(self, packed: Path, shard: str) -> Path:
        zstd = shutil.which("zstd")
        if zstd is None:
            raise FileNotFoundError(
                f"{packed} is zstd-compressed but the `zstd` tool is not installed (apt install zstd)"
            )
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="magi-shards-")
        out = Path(self._tmp.name) / Path(shard).name
        cmd = [zstd, "-d", "-q", "-f", str(packed), "-o", str(out)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise ValueError(f"could not decompress {packed}: {result.stderr.strip() or 'zstd failed'}")
        return out


def _parse_index(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        reason = f"{type(err).__name__}: {err}"
        raise ValueError(f"{index} is not a valid safetensors index ({reason}); re-download it") from None
    for key, shard in weight_map.items():
        _check_shard_name(index, str(key), shard)
    return {str(k): str(v) for k, v in weight_map.items()}


def _check_shard_name(index: Path, key: str, shard: object) -> None:
    """A shard must be a file name inside the checkpoint folder: an index entry with an absolute
    path or ``..`` would make the loader open a file elsewhere on the machine."""
    if not isinstance(shard, str) or not shard.strip():
        raise ValueError(f"{index}: weight_map[{key!r}] = {shard!r} is not a shard file name; re-download the index")
    windows = PureWindowsPath(shard)  # also sees drives (C:), UNC paths and backslash separators
    if Path(shard).is_absolute() or windows.is_absolute() or windows.drive or ".." in windows.parts:
        raise ValueError(
            f"{index}: weight_map[{key!r}] = {shard!r} points outside the checkpoint folder "
            "(absolute path or '..'); shards must be plain file names there: "
            "re-download the index"
        )


def _match_keys(
    cfg: MagiConfig,
    folder: Path,
    key_to_shard: dict[str, str],
    expected: dict[str, tuple[tuple[int, ...], torch.dtype]],
    layer_numbers: list[int],
) -> dict[str, str]:
    """model key -> checkpoint key for every model parameter; raises on missing / unexpected."""
    local_of = {g: i for i, g in enumerate(layer_numbers)}
    wanted: dict[str, str] = {}
    unexpected: list[str] = []
    for ckpt_key in key_to_shard:
        key = ckpt_key
        if m := _LAYER_KEY.match(ckpt_key):
            number = int(m.group(1))
            if number < cfg.model.num_layers and number not in local_of:
                continue  # a layer of another pipeline stage
            if number in local_of:
                key = f"videodit_blocks.layers.{local_of[number]}.{m.group(2)}"
        if key in expected:
            wanted[key] = ckpt_key
        else:
            unexpected.append(ckpt_key)
    missing = [k for k in expected if k not in wanted]
    if missing or unexpected:
        raise ValueError(_mismatch_message(cfg, folder, key_to_shard, missing, unexpected, []))
    return wanted


def _mismatch_message(
    cfg: MagiConfig,
    folder: Path,
    key_to_shard: dict[str, str],
    missing: list[str],
    unexpected: list[str],
    mis_shaped: list[str],
) -> str:
    parts = [f"checkpoint {folder} does not match the model config"]
    for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mis_shaped)):
        if items:
            more = len(items) - _MAX_LISTED
            shown = ", ".join(items[:_MAX_LISTED]) + (f", ... ({more} more)" if more > 0 else "")
            parts.append(f"{len(items)} {label} key(s): {shown}")
    parts.append(f"likely cause: {_likely_cause(cfg, key_to_shard, mis_shaped)}")
    return "; ".join(parts)


def _likely_cause(cfg: MagiConfig, key_to_shard: dict[str, str], mis_shaped: list[str]) -> str:
    ckpt_layers = {int(m.group(1)) for k in key_to_shard if (m := _LAYER_KEY.match(k))}
    n = max(ckpt_layers) + 1 if ckpt_layers else 0
    sizes = {34: "4.5B", 48: "24B"}
    if ckpt_layers and n != cfg.model.num_layers:
        known = n in sizes and cfg.model.num_layers in sizes
        guess = f": {sizes[n]} weights with a {sizes[cfg.model.num_layers]} config?" if known else ""
        return f"checkpoint has {n} layers but the config says num_layers={cfg.model.num_layers}{guess}"
    has_fp8 = any(k.endswith(_FP8_SUFFIXES) for k in key_to_shard)
    if has_fp8 and not cfg.engine.fp8_quant:
        return "the checkpoint has fp8 keys (weight_scale / input_scale) but engine_config.fp8_quant is false"
    if cfg.engine.fp8_quant and not has_fp8:
        return "engine_config.fp8_quant is true but the checkpoint has no fp8 keys (a bf16 checkpoint?)"
    if mis_shaped:
        return (
            "tensor shapes differ: the checkpoint was made for another model_config (hidden_size, heads, ffn, channels)"
        )
    return "the checkpoint is incomplete or from a different model; compare its keys with the model's"


def _read_tensors(
    cfg: MagiConfig,
    shards: _Shards,
    key_to_shard: dict[str, str],
    wanted: dict[str, str],
    expected: dict[str, tuple[tuple[int, ...], torch.dtype]],
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Read only the wanted keys, shard by shard, straight to their final device and dtype.

    Shapes are checked from the headers before a shard's tensors are read; every mismatch of
    the checkpoint is reported together.
    """
    by_shard: dict[str, list[str]] = defaultdict(list)
    for key, ckpt_key in wanted.items():
        by_shard[key_to_shard[ckpt_key]].append(key)
    state: dict[str, torch.Tensor] = {}
    mis_shaped: list[str] = []
    for shard, keys in sorted(by_shard.items()):
        with shards.open(shard) as f:
            bad = _check_header(shards, shard, f, {key: wanted[key] for key in keys}, expected)
            mis_shaped += bad
            for key in keys if not (bad or mis_shaped) else []:
                state[key] = f.get_tensor(wanted[key]).to(device=device, dtype=expected[key][1])
    if mis_shaped:
        raise ValueError(_mismatch_message(cfg, shards.folder, key_to_shard, [], [], mis_shaped))
    return state


def _check_header(
    shards: _Shards,
    shard: str,
    f,  # safetensors safe_open handle
    keys: dict[str, str],
    expected: dict[str, tuple[tuple[int, ...], torch.dtype]],
) -> list[str]:
    """Check one shard's header for the keys it should hold (model key -> checkpoint key).

    Raises on a key the index assigns to this shard but the shard lacks, and on integer / bool
    tensors (every DiT tensor is floating; fp8 checkpoints hold float8 weights and float scales):
    a cast would turn them into garbage weights silently. Returns the mis-shaped keys.
    """
    present = set(f.keys())
    absent = [ckpt_key for ckpt_key in keys.values() if ckpt_key not in present]
    if absent:
        where = shards.folder / INDEX_FILE if (shards.folder / INDEX_FILE).is_file() else shards.folder
        raise ValueError(
            f"{where} lists key {absent[0]} in shard {shard}, but {shards.folder / shard} has no "
            f"such tensor ({len(absent)} key(s) absent); the index and the shards are from "
            "different downloads or a shard is incomplete: download the checkpoint again"
        )
    not_float = []
    mis_shaped = []
    for key, ckpt_key in keys.items():
        info = f.get_slice(ckpt_key)
        dtype, shape = info.get_dtype(), tuple(info.get_shape())
        if not dtype.startswith(("F", "BF")):  # safetensors names: F16, BF16, F32, F8_E4M3, I64, BOOL...
            not_float.append(f"{ckpt_key} ({dtype})")
        elif shape != expected[key][0]:
            mis_shaped.append(f"{ckpt_key} {list(shape)} (model {list(expected[key][0])})")
    if not_float:
        more = f", ... ({len(not_float) - _MAX_LISTED} more)" if len(not_float) > _MAX_LISTED else ""
        raise ValueError(
            f"{shards.folder / shard} holds non-floating tensor(s) where floating weights are "
            f"expected: {', '.join(not_float[:_MAX_LISTED])}{more}; the file is not a MAGI-1 DiT "
            "checkpoint or was converted wrongly: download the checkpoint again"
        )
    return mis_shaped
