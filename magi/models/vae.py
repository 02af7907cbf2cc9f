"""MAGI-1's transformer VAE ("ViTVAE"): 8x spatial / 4x temporal compression, 16 latent channels.

Parameter names are the official checkpoint keys, so `<vae_pretrained>/` (diffusers-style
``config.json`` + ``diffusion_pytorch_model.safetensors``) loads without a rename table.
Behaviour: shared/spec/vae.md. The tiled encode/decode the pipeline uses lives at the end of
this file.

Shape legend: B batch, C channels, T frames (pixels) or latent frames, H W height / width,
L tokens (1 CLS + T'H'W'), E width, N heads, D head dim, z latent channels.

Precision. The official model runs in bf16 and hard-casts q/k/v to bf16 before attention even in
a float32 run (``bf16_qkv``). Decoding in the pipeline runs under CUDA bf16 autocast; ``decode(...,
autocast=True)`` reproduces that cast policy explicitly (linears/convs bf16, LayerNorms and the
position-embedding resize fp32), so CPU and GPU runs agree with the official numbers. A float32
model with ``bf16_qkv=False`` is exact float32 math.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from magi.budget import tile_frames

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
NORM_EPS = 1e-5  # per-head attention norm: added to the std, not the variance
ATTN_QUERY_BLOCK = 1024  # query rows per block in the CPU bf16 attention (bounds memory)


# --------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class VAEConfig:
    """The official ``ddconfig`` (field names verbatim). Defaults: the released VAE."""

    video_size: int = 256
    video_length: int = 16
    patch_size: int = 8
    patch_length: int = 4
    in_chans: int = 3
    z_chans: int = 16
    double_z: bool = True
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    qk_scale: float | None = None
    ln_in_attn: bool = True
    with_cls_token: bool = True
    conv_last_layer: bool = True
    use_rope: bool = False
    use_final_proj: bool = False
    norm_code: bool = False
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0

    @classmethod
    def from_dict(cls, ddconfig: dict[str, Any]) -> VAEConfig:
        """Build from an official ``ddconfig`` dict; unknown fields fail loudly."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(ddconfig) - known)
        if unknown:
            raise ValueError(f"VAE ddconfig has unknown field(s) {unknown}; known: {sorted(known)}")
        cfg = cls(**ddconfig)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Reject switch combinations the released VAE does not use (and magi does not build)."""
        required = {
            "ln_in_attn": True,
            "with_cls_token": True,
            "conv_last_layer": True,
            "double_z": True,
            "use_rope": False,
            "use_final_proj": False,
            "norm_code": False,
        }
        for name, value in required.items():
            if getattr(self, name) != value:
                raise ValueError(
                    f"VAE ddconfig.{name}={getattr(self, name)} is not supported (the released MAGI-1 VAE uses {value})"
                )
        if self.embed_dim % self.num_heads:
            raise ValueError(f"VAE embed_dim {self.embed_dim} not divisible by num_heads {self.num_heads}")
        if self.embed_dim % (self.patch_size**2 * self.patch_length):
            raise ValueError(
                f"VAE embed_dim {self.embed_dim} not divisible by patch volume {self.patch_size**2 * self.patch_length}"
            )

    @property
    def grid(self) -> tuple[int, int, int]:
        """Reference token grid (T0, H0, W0) of the learned position table."""
        side = self.video_size // self.patch_size
        return self.video_length // self.patch_length, side, side

    @property
    def unpatch_chans(self) -> int:
        """Cu: channels per pixel after the decoder's un-patchify (E / (pt*p*p))."""
        return self.embed_dim // (self.patch_size**2 * self.patch_length)


# ----------------------------------------------------------------------------------- attention
def _head_norm(x: torch.Tensor) -> torch.Tensor:
    """Parameter-free per-head norm (x - mean) / (std + eps), population std, in x's dtype."""
    mean = x.mean(dim=-1, keepdim=True)
    std = x.std(dim=-1, keepdim=True, unbiased=False)
    return (x - mean) / (std + NORM_EPS)


def _attention_bf16(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Full attention on bf16 q/k/v [B, N, L, D] with flash-attention's rounding.

    On CUDA the fused kernel is the official arithmetic. On CPU it is emulated: fp32 scores, row
    max / exp / sum in fp32, exp(S - max) rounded to bf16 before P.V (fp32 accumulation), divided
    by the fp32 row sum, output rounded to bf16 (spec/vae.md §4). Query blocks bound memory.
    """
    if q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    kf, vf = k.float(), v.float()
    out = []
    for q_blk in q.split(ATTN_QUERY_BLOCK, dim=2):
        s = torch.matmul(q_blk.float(), kf.transpose(-1, -2)) * scale  # [B, N, l, L]
        p = torch.exp(s - s.amax(dim=-1, keepdim=True))
        o = torch.matmul(p.bfloat16().float(), vf) / p.sum(dim=-1, keepdim=True)
        out.append(o.bfloat16())
    return torch.cat(out, dim=2)


class Attention(nn.Module):
    """Multi-head self-attention with the per-head norm on q, k and v (``ln_in_attn``)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, qk_scale: float | None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = qk_scale if qk_scale is not None else (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, bf16_qkv: bool) -> torch.Tensor:
        qkv = _linear(self.qkv, x)  # [B, L, 3E]
        q, k, v = rearrange(qkv, "b l (three n d) -> three b n l d", three=3, n=self.num_heads)
        q, k, v = _head_norm(q), _head_norm(k), _head_norm(v)
        if bf16_qkv:  # the official code casts to bf16 here whatever the model dtype
            out = _attention_bf16(q.bfloat16(), k.bfloat16(), v.bfloat16(), self.scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        out = rearrange(out, "b n l d -> b l (n d)")
        return _linear(self.proj, out)


# ------------------------------------------------------------------------------------- blocks
def _linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """Linear in the weight dtype (what CUDA autocast does for bf16 weights; a no-op otherwise)."""
    return layer(x.to(layer.weight.dtype))


def _layer_norm(norm: nn.LayerNorm, x: torch.Tensor, autocast: bool) -> torch.Tensor:
    """LayerNorm; under the autocast emulation it computes and returns fp32."""
    if not autocast:
        return norm(x)
    return F.layer_norm(x.float(), norm.normalized_shape, norm.weight.float(), norm.bias.float(), norm.eps)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _linear(self.fc2, F.gelu(_linear(self.fc1, x)))


class Block(nn.Module):
    """x + Attn(x), then x + MLP(LN2(x)); no pre-attention norm (it is inside the attention)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        dim = cfg.embed_dim
        self.attn = Attention(dim, cfg.num_heads, cfg.qkv_bias, cfg.qk_scale)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio))

    def forward(self, x: torch.Tensor, bf16_qkv: bool, autocast: bool) -> torch.Tensor:
        x = x + self.attn(x, bf16_qkv)
        return x + self.mlp(_layer_norm(self.norm2, x, autocast))


def _resized_pos_embed(
    pos_embed: torch.Tensor, ref_grid: tuple[int, int, int], grid: tuple[int, int, int], dtype: torch.dtype
) -> torch.Tensor:
    """[1, 1 + T0 H0 W0, E] table -> [1, 1 + T'H'W', E] (trilinear, CLS row kept as is).

    The resize runs in ``dtype``: fp32 under autocast (its cast policy for upsampling), else the
    model dtype with the device's own bf16 kernel, as the official eager encode. The stored table
    is returned unchanged when the grid is the reference grid.
    """
    if tuple(grid) == tuple(ref_grid):
        return pos_embed
    t0, h0, w0 = ref_grid
    vol = rearrange(pos_embed[:, 1:].to(dtype), "b (t h w) e -> b e t h w", t=t0, h=h0, w=w0)
    vol = F.interpolate(vol, size=tuple(grid), mode="trilinear", align_corners=False)
    vol = rearrange(vol, "b e t h w -> b (t h w) e")
    return torch.cat([pos_embed[:, :1].to(dtype), vol], dim=1)


class _Transformer(nn.Module):
    """CLS token + learned position table + blocks + final LayerNorm (shared by both halves)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        t0, h0, w0 = cfg.grid
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + t0 * h0 * w0, cfg.embed_dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=1e-5)

    def _run(self, tokens: torch.Tensor, grid: tuple[int, int, int], bf16_qkv: bool, autocast: bool) -> torch.Tensor:
        """tokens [B, T'H'W', E] -> normed tokens [B, T'H'W', E] (CLS dropped)."""
        cls = self.cls_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype)
        x = torch.cat([cls, tokens], dim=1)  # [B, L, E]
        pos = _resized_pos_embed(
            self.pos_embed, self.cfg.grid, grid, torch.float32 if autocast else self.pos_embed.dtype
        )
        # Eager (non-autocast) runs add the table in the model dtype; under autocast the fp32
        # table turns the residual stream fp32 from here on (as CUDA autocast does).
        x = x + (pos if autocast else pos.to(x.dtype))
        for block in self.blocks:
            x = block(x, bf16_qkv, autocast)
        return _layer_norm(self.norm, x, autocast)[:, 1:]


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        kernel = (cfg.patch_length, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_chans, cfg.embed_dim, kernel_size=kernel, stride=kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.to(self.proj.weight.dtype))  # [B, E, T', H', W']


class Encoder(_Transformer):
    """Video [B, 3, T, H, W] in [-1, 1] -> moments [B, 2z, T/4, H/8, W/8]."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__(cfg)
        self.patch_embed = PatchEmbed(cfg)
        self.last_layer = nn.Linear(cfg.embed_dim, 2 * cfg.z_chans)

    def forward(self, x: torch.Tensor, bf16_qkv: bool = True, autocast: bool = False) -> torch.Tensor:
        x = self.patch_embed(x)
        _, _, t, h, w = x.shape
        x = self._run(rearrange(x, "b e t h w -> b (t h w) e"), (t, h, w), bf16_qkv, autocast)
        x = _linear(self.last_layer, x)  # [B, T'H'W', 2z]
        return rearrange(x, "b (t h w) c -> b c t h w", t=t, h=h, w=w)


class Decoder(_Transformer):
    """Latent [B, z, T', H', W'] -> video [B, 3, 4T', 8H', 8W'] (approximately in [-1, 1])."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__(cfg)
        self.proj_in = nn.Linear(cfg.z_chans, cfg.embed_dim)
        self.last_layer = nn.Conv3d(cfg.unpatch_chans, cfg.in_chans, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor, bf16_qkv: bool = True, autocast: bool = False) -> torch.Tensor:
        _, _, t, h, w = z.shape
        # No .contiguous(): CPU bf16 GEMMs round differently for strided inputs, and the official
        # reshape (a view where possible, a copy otherwise) is what the fixtures recorded.
        x = _linear(self.proj_in, rearrange(z, "b c t h w -> b (t h w) c"))
        x = self._run(x, (t, h, w), bf16_qkv, autocast)  # [B, T'H'W', E]
        p, pt = self.cfg.patch_size, self.cfg.patch_length
        x = rearrange(x, "b (t h w) (pt ph pw c) -> b c (t pt) (h ph) (w pw)", t=t, h=h, w=w, pt=pt, ph=p, pw=p)
        return self.last_layer(x.to(self.last_layer.weight.dtype))


# -------------------------------------------------------------------------------------- model
class ViTVAE(nn.Module):
    """The MAGI-1 transformer VAE. ``encode`` gives the posterior mean, never a sample.

    Args:
        ddconfig: the official ``ddconfig`` (dict) or a ``VAEConfig``.
        bf16_qkv: cast q/k/v to bf16 before attention, as the official code always does.
            ``False`` gives exact float32 math for a float32 model (CPU tests).
    """

    def __init__(self, ddconfig: VAEConfig | dict[str, Any], bf16_qkv: bool = True) -> None:
        super().__init__()
        cfg = ddconfig if isinstance(ddconfig, VAEConfig) else VAEConfig.from_dict(ddconfig)
        cfg.validate()
        self.config = cfg
        self.bf16_qkv = bf16_qkv
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.reset_parameters()

    def reset_parameters(self, seed: int | None = None) -> None:
        """Random init (truncated normal std 0.02, zero biases, unit norms) for tiny test models.

        Args:
            seed: seed of a private generator (None: the global RNG).
        """
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            if p.is_meta:  # built on the meta device by load_vae: weights come from the file
                continue
            with torch.no_grad():
                if name.endswith("bias"):
                    p.zero_()
                elif ".norm" in name:
                    p.fill_(1.0)
                else:
                    t = torch.empty(p.shape, dtype=torch.float32)
                    nn.init.trunc_normal_(t, std=0.02, a=-0.04, b=0.04, generator=gen)
                    p.copy_(t)

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.pos_embed.dtype

    @property
    def device(self) -> torch.device:
        return self.encoder.pos_embed.device

    def encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        """Video [B, 3, T, H, W] in [-1, 1] -> Gaussian moments [B, 2z, T/4, H/8, W/8]."""
        return self.encoder(x, self.bf16_qkv)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Video [B, 3, T, H, W] in [-1, 1] -> posterior mean [B, z, T/4, H/8, W/8].

        A single frame (T = 1) is repeated to one temporal patch and latent frame 0 is kept.
        """
        _check_video(x, self.config)
        single = x.shape[2] == 1
        if single:
            x = x.expand(-1, -1, self.config.patch_length, -1, -1)
        mean = self.encode_moments(x)[:, : self.config.z_chans]
        return mean[:, :, :1] if single else mean

    @torch.no_grad()
    def decode(self, z: torch.Tensor, autocast: bool = False) -> torch.Tensor:
        """Latent [B, z, T', H', W'] -> video [B, 3, 4T', 8H', 8W'] (not clamped).

        A single latent frame decodes to ONE frame (the first of its 4), as officially.

        Args:
            z: latents (unscaled, i.e. already divided by the scale factor).
            autocast: emulate the pipeline's CUDA bf16 autocast (needs bf16 weights to matter).
        """
        if z.ndim != 5 or z.shape[1] != self.config.z_chans:
            raise ValueError(
                f"VAE decode expects [B, {self.config.z_chans}, T, H, W] latents, got shape {tuple(z.shape)}"
            )
        if not autocast:
            z = z.to(self.dtype)
        video = self.decoder(z, self.bf16_qkv, autocast)
        return video[:, :, :1] if z.shape[2] == 1 else video


def _check_video(x: torch.Tensor, cfg: VAEConfig) -> None:
    if x.ndim != 5 or x.shape[1] != cfg.in_chans:
        raise ValueError(f"VAE encode expects [B, {cfg.in_chans}, T, H, W] video, got shape {tuple(x.shape)}")
    t, h, w = x.shape[2:]
    if h % cfg.patch_size or w % cfg.patch_size or h == 0 or w == 0:
        raise ValueError(
            f"VAE encode: height and width must be positive multiples of "
            f"{cfg.patch_size}, got {h}x{w}; resize the input first"
        )
    if t != 1 and (t < cfg.patch_length):
        raise ValueError(f"VAE encode: needs 1 or at least {cfg.patch_length} frames, got {t}")


# ------------------------------------------------------------------------------------- loading
def read_vae_config(folder: str | Path) -> VAEConfig:
    """Parse ``<folder>/config.json`` (diffusers style, ``_class_name`` "ViTVAE")."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"VAE config not found: {path} (expected the official vae folder with {CONFIG_NAME} and {WEIGHTS_NAME})"
        )
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); download it again") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a JSON object (the diffusers VAE config)")
    if raw.get("_class_name") != "ViTVAE":
        raise ValueError(f"{path}: _class_name is {raw.get('_class_name')!r}, expected 'ViTVAE'")
    if raw.get("model_type", "vit") != "vit":
        raise ValueError(
            f"{path}: model_type {raw.get('model_type')!r} is not supported "
            "(only 'vit'; the official 'vit_ncthw' module does not exist)"
        )
    if not isinstance(raw.get("ddconfig"), dict):
        raise ValueError(f"{path}: missing the 'ddconfig' object")
    return VAEConfig.from_dict(raw["ddconfig"])


def load_vae(
    folder: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    bf16_qkv: bool | None = None,
) -> ViTVAE:
    """Load the official VAE folder (config.json + diffusion_pytorch_model.safetensors).

    Args:
        folder: the official ``vae_pretrained`` folder.
        device: where the weights go.
        dtype: parameter dtype (the official pipeline uses torch.bfloat16).
        bf16_qkv: round q/k/v to bf16 in attention (official). Default: True unless dtype is
            float32, so a float32 load is exact float32 math.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    cfg = read_vae_config(folder)
    weights = Path(folder) / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"VAE weights not found: {weights} (only safetensors is supported)")
    with torch.device("meta"):
        model = ViTVAE(cfg, bf16_qkv=dtype != torch.float32 if bf16_qkv is None else bf16_qkv)
    try:
        state = load_file(str(weights), device=str(device))
    except SafetensorError as err:  # truncated download, or not a safetensors file
        raise ValueError(
            f"{weights} is not a readable safetensors file ({err}); it is truncated or corrupt: download it again"
        ) from None
    _check_keys(model, state, weights)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def _check_keys(model: nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    """One error listing every missing, unexpected and mis-shaped key."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {expected[k]}"
        for k in set(expected) & set(state)
        if tuple(state[k].shape) != expected[k]
    )
    if missing or unexpected or shapes:
        raise ValueError(
            f"VAE checkpoint {where} does not match its config.json: "
            f"missing {missing}, unexpected {unexpected}, mis-shaped {shapes}"
        )


# -------------------------------------------------------------------------------------- tiling
@dataclass(frozen=True)
class TileSpec:
    """Tiling of the pipeline's VAE calls (pixel units; the temporal tiles never overlap).

    Args:
        size: spatial tile side in pixels (official 256).
        frames: temporal tile length in frames (official fps // 2, see ``tile_spec_for_fps``).
        overlap: spatial overlap factor (official 0.25).
    """

    size: int = 256
    frames: int = 12
    overlap: float = 0.25

    def __post_init__(self) -> None:
        # multiples of the patch sizes of the released VAE (8 px, 4 frames): a tile must hold
        # at least one latent in every direction, else the tiling loops cannot advance
        if self.size < 8 or self.size % 8:
            raise ValueError(f"tile size must be a positive multiple of 8 px, got {self.size}")
        if self.frames < 4:
            raise ValueError(
                f"temporal tile must hold at least 4 frames, got {self.frames} (official: fps // 2, so fps >= 8)"
            )
        if not 0 <= self.overlap < 1:
            raise ValueError(f"tile overlap must be in [0, 1), got {self.overlap}")


def tile_spec_for_fps(fps: int, compat: str = "magi") -> TileSpec:
    """The temporal tile at this fps (the rule: ``magi.budget.tile_frames``)."""
    return TileSpec(frames=tile_frames(fps, compat))


def _ramp(n: int, ref: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blend weights (1 - k/n, k/n), k = 0..n-1, computed in float64 like Python scalars, then
    fp32 (the op math type), shaped to broadcast along ``dim`` of ref."""
    r = torch.arange(n, dtype=torch.float64) / n
    shape = [1] * ref.ndim
    shape[dim] = n
    as_f32 = lambda w: w.to(device=ref.device, dtype=torch.float32).view(shape)  # noqa: E731
    return as_f32(1 - r), as_f32(r)


def _blend(prev: torch.Tensor, cur: torch.Tensor, extent: int, dim: int) -> torch.Tensor:
    """cur[k] = prev[-E + k] * (1 - k/E) + cur[k] * k/E along dim, E = min(sizes, extent).

    Eager arithmetic in cur's dtype: each multiply and the add round (fp32 op math), which
    reproduces the official fixtures bit for bit in both directions. Returns a new tensor.
    """
    e = min(prev.shape[dim], cur.shape[dim], extent)
    if e <= 0:
        return cur
    w_prev, w_cur = _ramp(e, cur, dim)
    a, b = prev.narrow(dim, prev.shape[dim] - e, e).float(), cur.narrow(dim, 0, e).float()
    dt = cur.dtype
    mixed = (a * w_prev).to(dt).float() + (b * w_cur).to(dt).float()
    out = cur.clone()
    out.narrow(dim, 0, e).copy_(mixed.to(dt))
    return out


def _starts(size: int, stride: int) -> range:
    return range(0, size, stride)


@torch.no_grad()
def tiled_encode(vae: ViTVAE, x: torch.Tensor, spec: TileSpec = TileSpec()) -> torch.Tensor:
    """Official tiled encode: video [B, 3, T, H, W] in [-1, 1] -> posterior mean [B, z, T', H', W'].

    Tiles are encoded one at a time (bounded memory); each blends into its stored upper and left
    neighbours in place, as officially, so later tiles see already blended neighbours.
    """
    cfg = vae.config
    lat = spec.size // cfg.patch_size  # latent tile side
    stride = int(spec.size * (1 - spec.overlap))
    extent = int(lat * spec.overlap)
    keep, t_keep = lat - extent, spec.frames // cfg.patch_length
    slabs = []
    for t0 in _starts(x.shape[2], spec.frames):
        above: list[torch.Tensor] = []
        rows = []
        for h0 in _starts(x.shape[3], stride):
            row: list[torch.Tensor] = []
            for w0 in _starts(x.shape[4], stride):
                window = x[:, :, t0 : t0 + spec.frames, h0 : h0 + spec.size, w0 : w0 + spec.size]
                tile = vae.encode(window)  # [B, z, <=3, <=32, <=32]
                if above:
                    tile = _blend(above[len(row)], tile, extent, dim=3)
                if row:
                    tile = _blend(row[-1], tile, extent, dim=4)
                row.append(tile)
            rows.append(torch.cat([t[:, :, :t_keep, :keep, :keep] for t in row], dim=4))
            above = row
        slabs.append(torch.cat(rows, dim=3))
    return torch.cat(slabs, dim=2)


@torch.no_grad()
def tiled_decode(vae: ViTVAE, z: torch.Tensor, spec: TileSpec = TileSpec(), autocast: bool = True) -> torch.Tensor:
    """Official tiled decode: latent [B, z, T', H', W'] -> video [B, 3, F, 8H', 8W'].

    Temporal tiles hold spec.frames // 4 latent frames; a lone trailing latent frame decodes to
    one frame (official quirk: 3q+1 latents -> 12q+1 frames). Each tile is blended on a copy
    with its raw upper and left neighbours. Only one row of raw tiles is held at a time.

    Args:
        autocast: emulate the pipeline's CUDA bf16 autocast (see ``ViTVAE.decode``).
    """
    cfg = vae.config
    lat = spec.size // cfg.patch_size
    stride = int(lat * (1 - spec.overlap))
    extent = int(spec.size * spec.overlap)
    keep, t_lat = spec.size - extent, spec.frames // cfg.patch_length
    slabs = []
    for t0 in _starts(z.shape[2], t_lat):
        above: list[torch.Tensor] = []
        rows = []
        for h0 in _starts(z.shape[3], stride):
            raw = [
                vae.decode(z[:, :, t0 : t0 + t_lat, h0 : h0 + lat, w0 : w0 + lat], autocast)
                for w0 in _starts(z.shape[4], stride)
            ]
            kept = []
            for j, tile in enumerate(raw):
                if above:
                    tile = _blend(above[j], tile, extent, dim=3)
                if j:
                    tile = _blend(raw[j - 1], tile, extent, dim=4)
                kept.append(tile[:, :, : t_lat * cfg.patch_length, :keep, :keep])
            rows.append(torch.cat(kept, dim=4))
            above = raw
        slabs.append(torch.cat(rows, dim=3))
    return torch.cat(slabs, dim=2)
