"""fp8 ("distill_quant") linears: a module swap applied to the DiT before loading.

The released fp8 checkpoints replace seven Linears in every layer except the first and the last
(shared/spec/dit.md §1.3). Two module types hold the stored tensors under the official names:

* ``PerTensorFp8Linear`` (q, qx, k, v, fc1): weight [1, out, in] e4m3, weight_scale [1],
  input_scale [in]. The input is divided by the whole input_scale vector but the GEMM rescales
  by input_scale[0] only (the official bmm_fp8 takes a scalar activation scale).
* ``PerChannelFp8Linear`` (linear_proj, fc2): weight [1, out, in] e4m3, weight_scale [1],
  input_scale [1], smooth_scale [1, in]; the input is divided by smooth_scale.

Inputs are quantised as the official code does: float32 divide, clamp to +-448, round to bf16
and then to e4m3 (double rounding). The GEMM runs on ``torch._scaled_mm`` where the GPU has fp8
tensor cores (sm89+), otherwise as exact float32 arithmetic on the dequantised operands; both
accumulate in float32 and return ``out_dtype`` (params_dtype). The float32 path reproduces the
official fp8 reference run bit for bit; CPU ``torch._scaled_mm`` (available in torch 2.13) rounds
differently (~2e-3 on the fixture's output), so it is used on CUDA only.

Memory: neither path holds a float32 copy of the whole GEMM input or output. Quantisation and
the float32 fallback GEMM run over blocks of rows whose float32 temporaries stay within
BLOCK_ELEMENTS elements, writing into one preallocated e4m3 / ``out_dtype`` result, so the extra
memory of an fp8 Linear is its e4m3 input copy (1 byte per element) plus the output. Rows are
independent in both, so the blocking changes no number.

Legend: M rows (tokens), K in features, O out features.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
# float32 elements held at once by a block of quantisation / fallback GEMM (16 MiB).
BLOCK_ELEMENTS = 1 << 22
_planning = False  # set by planning_cuda_path (magi.plan's fake-tensor runs)


@contextmanager
def planning_cuda_path() -> Iterator[None]:
    """Inside, fp8 Linears take the path of a GPU with fp8 tensor cores (``torch._scaled_mm``) on
    any device, and quantisation runs its first row block only (every block allocates alike).
    For ``magi.plan``'s fake tensors, whose values are never read; not for real runs."""
    global _planning
    before, _planning = _planning, True
    try:
        yield
    finally:
        _planning = before


PER_TENSOR_NAMES = (
    "self_attention.linear_qkv.q",
    "self_attention.linear_qkv.qx",
    "self_attention.linear_qkv.k",
    "self_attention.linear_qkv.v",
    "mlp.linear_fc1",
)
PER_CHANNEL_NAMES = ("self_attention.linear_proj", "mlp.linear_fc2")


def quantize_input(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale (broadcast on the last dim) in float32, clamped, rounded to bf16 then to e4m3.

    Computed over blocks of rows into one e4m3 result, so at most BLOCK_ELEMENTS float32 values
    exist at a time (the official arithmetic, without float32 copies of the whole input).
    """
    inv = scale.float().reshape(-1)
    rows = x.reshape(-1, x.shape[-1])
    out = torch.empty(rows.shape, dtype=FP8, device=x.device)
    pairs = list(zip(_row_blocks(rows), _row_blocks(out)))
    for block, dst in pairs[:1] if _planning else pairs:
        q = (
            block.to(torch.float32, copy=True).div_(inv).clamp_(-FP8_MAX, FP8_MAX)
        )  # one float32 block, updated in place
        dst.copy_(q.to(torch.bfloat16))  # bf16 rounding, then e4m3 rounding by the copy
        del q  # else it lives on while the next block is built
    return out.reshape(x.shape)


def _row_blocks(x: torch.Tensor) -> list[torch.Tensor]:
    """x [M, K] split along M into views of at most BLOCK_ELEMENTS elements each."""
    step = max(1, BLOCK_ELEMENTS // max(1, x.shape[-1]))
    return list(x.split(step, dim=0)) if x.shape[0] else [x]


def fp8_matmul(a: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """(a @ w^T) * scale with fp8 operands. a [M, K] e4m3, w [O, K] e4m3, scale scalar float32."""
    if _scaled_mm_ok(a, w):
        rows = a.shape[0]
        if rows % 16:  # cuBLASLt wants M % 16 == 0 (padding copies the input, so only when needed)
            a = F.pad(a.view(torch.uint8), (0, 0, 0, -rows % 16)).view(FP8)
        one = torch.ones((), device=a.device, dtype=torch.float32)
        scale_a = scale.reshape(()).float()
        return torch._scaled_mm(a, w.t(), scale_a=scale_a, scale_b=one, out_dtype=out_dtype)[:rows]
    return _fallback_matmul(a, w, scale, out_dtype)


def _fallback_matmul(a: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Exact float32 GEMM on the dequantised operands, over row blocks into one out_dtype result."""
    wt, s = w.float().t(), scale.float()  # the weight's float32 copy: parameter-sized, not per token
    out = torch.empty(a.shape[0], w.shape[0], dtype=out_dtype, device=a.device)
    step = max(1, BLOCK_ELEMENTS // max(1, a.shape[1], w.shape[0]))
    for start in range(0, a.shape[0], step):
        block = a[start : start + step].float() @ wt
        out[start : start + step] = block.mul_(s)
        del block  # else it lives on while the next block is multiplied
    return out


def _scaled_mm_ok(a: torch.Tensor, w: torch.Tensor) -> bool:
    """fp8 tensor cores exist (sm89+) and the GEMM's K and O are multiples of 16."""
    if not _planning and (a.device.type != "cuda" or torch.cuda.get_device_capability(a.device) < (8, 9)):
        return False
    return a.shape[1] % 16 == 0 and w.shape[0] % 16 == 0


class _Fp8Linear(nn.Module):
    """Shared storage: weight [1, O, K] e4m3 and weight_scale [1] (official names and shapes)."""

    def __init__(
        self, in_features: int, out_features: int, out_dtype: torch.dtype, device: torch.device | None
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.out_dtype = in_features, out_features, out_dtype
        weight = torch.zeros(1, out_features, in_features, dtype=FP8, device=device)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.weight_scale = nn.Parameter(torch.ones(1, device=device), requires_grad=False)

    def _gemm(self, a: torch.Tensor, scale: torch.Tensor, lead: torch.Size) -> torch.Tensor:
        a = a.reshape(-1, self.in_features)
        out = fp8_matmul(a, self.weight[0], scale * self.weight_scale, self.out_dtype)
        return out.reshape(*lead, self.out_features)

    def set_from_weight(self, weight: torch.Tensor) -> None:
        """Quantise a float weight [O, K] with one per-tensor scale (for random test models)."""
        scale = weight.float().abs().amax().clamp_min(1e-12) / FP8_MAX
        self.weight.data = (weight.float() / scale).to(FP8)[None]
        self.weight_scale.data = scale.reshape(1).to(self.weight_scale.device)


class PerTensorFp8Linear(_Fp8Linear):
    """fp8 Linear with a per-input-channel quantisation vector and a scalar rescale (official quirk)."""

    def __init__(
        self, in_features: int, out_features: int, out_dtype: torch.dtype, device: torch.device | None = None
    ) -> None:
        super().__init__(in_features, out_features, out_dtype, device)
        self.input_scale = nn.Parameter(torch.ones(in_features, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> [..., O] in out_dtype."""
        a = quantize_input(x, self.input_scale)
        return self._gemm(a, self.input_scale[0], x.shape[:-1])


class PerChannelFp8Linear(_Fp8Linear):
    """fp8 Linear with a SmoothQuant-style per-input-channel divisor and scalar input scale."""

    def __init__(
        self, in_features: int, out_features: int, out_dtype: torch.dtype, device: torch.device | None = None
    ) -> None:
        super().__init__(in_features, out_features, out_dtype, device)
        self.input_scale = nn.Parameter(torch.ones(1, device=device), requires_grad=False)
        self.smooth_scale = nn.Parameter(torch.ones(1, in_features, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> [..., O] in out_dtype."""
        a = quantize_input(x, self.smooth_scale)
        return self._gemm(a, self.input_scale, x.shape[:-1])


def is_fp8_layer(layer_number: int, num_layers: int) -> bool:
    """Official rule: every layer but the first and the last (global numbering) is quantised."""
    return 0 < layer_number < num_layers - 1


def swap_fp8_linears(model: nn.Module, num_layers: int, *, quantize_weights: bool = False) -> nn.Module:
    """Replace the seven Linears of each quantised DiT layer by fp8 modules, in place.

    Args:
        model: a DiT (any device, meta included); layers carry their global ``layer_number``.
        num_layers: the config's total layer count (decides which layers are quantised).
        quantize_weights: fill the fp8 weights from the replaced Linears (random test models);
            False leaves placeholders to be overwritten by a checkpoint load.
    """
    for layer in model.videodit_blocks.layers:
        if not is_fp8_layer(layer.layer_number, num_layers):
            continue
        for name in PER_TENSOR_NAMES:
            _swap(layer, name, PerTensorFp8Linear, quantize_weights)
        for name in PER_CHANNEL_NAMES:
            _swap(layer, name, PerChannelFp8Linear, quantize_weights)
    return model


def _swap(layer: nn.Module, dotted: str, cls: type[_Fp8Linear], quantize_weights: bool) -> None:
    parent_name, _, attr = dotted.rpartition(".")
    parent = layer.get_submodule(parent_name)
    old: nn.Linear = getattr(parent, attr)
    new = cls(old.in_features, old.out_features, old.weight.dtype, device=old.weight.device)
    if quantize_weights:
        new.set_from_weight(old.weight.detach())
    setattr(parent, attr, new)
