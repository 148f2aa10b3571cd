"""Quantization arithmetic, exactly as ONNX `QuantizeLinear` / `DequantizeLinear` compute it.

    q  = saturate(round_half_even(x / s) + z)        x' = s * (q - z)

Affine (asymmetric) parameters widen the range to include 0 so that 0 is exact; symmetric ones
use z = 0 and the INT8 range [-127, 127] (so that -x quantizes to -q).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import InvalidArgumentError


@dataclass(frozen=True)
class QType:
    """An integer type the runtime executes: its name and its representable range."""

    name: str
    qmin: int
    qmax: int


INT8 = QType("int8", -128, 127)
UINT8 = QType("uint8", 0, 255)
QTYPES = {t.name: t for t in (INT8, UINT8)}


@dataclass(frozen=True)
class QParams:
    """Scale and zero point (tensors: 0-d per tensor, 1-d per channel, 2-d per group)."""

    scale: torch.Tensor
    zero_point: torch.Tensor
    qtype: QType
    symmetric: bool
    axis: int | None = None  # channel axis for per-channel parameters
    group_size: int | None = None  # block length along the last axis for per-group parameters

    @property
    def qmin(self) -> int:
        # symmetric INT8 drops -128 so that the range is symmetric around 0
        return -127 if self.symmetric and self.qtype is INT8 else self.qtype.qmin

    @property
    def qmax(self) -> int:
        return self.qtype.qmax


def qtype_for(name: str) -> QType:
    try:
        return QTYPES[name]
    except KeyError:
        raise InvalidArgumentError(f"`qtype` must be one of {sorted(QTYPES)}, but got {name!r}.") from None


def compute_qparams(
    lo: torch.Tensor | float,
    hi: torch.Tensor | float,
    *,
    symmetric: bool,
    qtype: QType = INT8,
    axis: int | None = None,
    group_size: int | None = None,
) -> QParams:
    """Scale and zero point that map the float range [lo, hi] (per element of lo/hi) onto `qtype`."""
    lo = torch.as_tensor(lo, dtype=torch.float64)
    hi = torch.as_tensor(hi, dtype=torch.float64)
    if torch.any(lo > hi):
        raise InvalidArgumentError(f"`lo <= hi` must hold, but got lo={lo.tolist()} hi={hi.tolist()}.")
    lo = torch.clamp(lo, max=0.0)  # widen to include 0 so that 0 is exactly representable
    hi = torch.clamp(hi, min=0.0)
    if symmetric:
        if qtype is INT8:
            scale = torch.maximum(-lo, hi) / 127.0
            zero_point = torch.zeros_like(scale)
        else:  # symmetric UINT8: zero sits in the middle of [0, 255]
            scale = torch.maximum(-lo, hi) / 127.5
            zero_point = torch.full_like(scale, 128.0)
    else:
        scale = (hi - lo) / float(qtype.qmax - qtype.qmin)
        zero_point = None
    # a constant-zero tensor has no range: any scale represents it exactly; 1.0 as ONNX tools do
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).to(torch.float32)
    if zero_point is None:
        zero_point = torch.round(qtype.qmin - lo / scale.double()).clamp(qtype.qmin, qtype.qmax)
    return QParams(scale, zero_point.to(torch.int32), qtype, symmetric, axis, group_size)


def _broadcast(p: torch.Tensor, x: torch.Tensor, qp: QParams) -> torch.Tensor:
    if qp.group_size is not None:  # [..., n_groups] -> [..., n_groups * group_size]
        return p.repeat_interleave(qp.group_size, dim=-1)
    if qp.axis is None or p.dim() == 0:
        return p
    shape = [1] * x.dim()
    shape[qp.axis] = -1
    return p.reshape(shape)


def quantize(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """Float -> integer codes (int32 tensor holding `qp.qtype` values), saturating, half to even."""
    s = _broadcast(qp.scale, x, qp)
    z = _broadcast(qp.zero_point, x, qp)
    return torch.clamp(torch.round(x.float() / s) + z, qp.qmin, qp.qmax).to(torch.int32)


def dequantize(q: torch.Tensor, qp: QParams) -> torch.Tensor:
    s = _broadcast(qp.scale, q, qp)
    z = _broadcast(qp.zero_point, q, qp)
    return s * (q - z).to(torch.float32)


def fake_quantize(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """Quantize then dequantize: the float values an INT8 runtime sees."""
    return dequantize(quantize(x, qp), qp).to(x.dtype)


def weight_qparams(weight: torch.Tensor, granularity: str, group_size: int = 32) -> QParams:
    """Symmetric INT8 parameters for a weight tensor whose axis 0 is the output channel.

    Weights are always symmetric: ONNX Runtime's INT8 kernels expect a zero weight zero point.
    """
    w = weight.detach().float()
    if granularity == "per_tensor":
        return compute_qparams(w.min(), w.max(), symmetric=True)
    if granularity == "per_channel":
        flat = w.reshape(w.shape[0], -1)
        return compute_qparams(flat.min(1).values, flat.max(1).values, symmetric=True, axis=0)
    if granularity == "per_group":
        if w.shape[-1] % group_size:
            raise InvalidArgumentError(
                f"per-group quantization needs the last weight dimension to be a multiple of "
                f"`group_size`, but got shape {tuple(w.shape)} and {group_size=}."
            )
        blocks = w.reshape(*w.shape[:-1], w.shape[-1] // group_size, group_size)
        return compute_qparams(blocks.amin(-1), blocks.amax(-1), symmetric=True, group_size=group_size)
    raise InvalidArgumentError(
        f"`granularity` must be 'per_tensor', 'per_channel' or 'per_group', but got {granularity!r}."
    )


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when the two are identical)."""
    noise = torch.sum((reference.double() - approx.double()) ** 2).item()
    signal = torch.sum(reference.double() ** 2).item()
    if noise == 0:
        return float("inf")
    if signal == 0:
        return float("-inf")
    return 10.0 * torch.log10(torch.tensor(signal / noise)).item()
