"""The two custom ops that carry quantization through eager simulation and torch.export:
`quanttune::quantize_dequantize` (an activation's QuantizeLinear -> DequantizeLinear) and
`quanttune::dequantize_weight` (an int8 weight's DequantizeLinear), with their ONNX translations.
Simulation and export call the same op, so they compute the same numbers."""

from __future__ import annotations

import threading
from typing import Any

import torch

_OPS: dict[str, Any] = {}
# torch.export keeps process-wide tracing state (torch.fx.traceback's node meta) that an eager call
# of a custom op changes too (torch wraps its kernel in torch._disable_dynamo, which annotates that
# meta): a simulated forward in one thread while another exported failed with KeyError('custom').
# Exports hold this lock (`onnx_export`), and so does every eager call of `quantize_dequantize`;
# re-entrant, because the exporting thread calls it while tracing.
TRACE_LOCK = threading.RLock()


def qdq_ops() -> dict[str, Any]:
    """Register (once) `quanttune::quantize_dequantize` and `quanttune::dequantize_weight`."""
    if _OPS:
        return _OPS
    namespace = torch.ops.quanttune
    if hasattr(namespace, "quantize_dequantize"):  # registered by an earlier import of this module
        _OPS.update(qdq=namespace.quantize_dequantize.default, dq=namespace.dequantize_weight.default)
        return _OPS

    @torch.library.custom_op("quanttune::quantize_dequantize", mutates_args=())
    def quantize_dequantize(x: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int) -> torch.Tensor:
        s = torch.tensor(scale, dtype=torch.float32)
        z = torch.tensor(zero_point, dtype=torch.int32)
        return torch.fake_quantize_per_tensor_affine(x.float(), s, z, qmin, qmax).to(x.dtype)

    @quantize_dequantize.register_fake
    def _(x, scale, zero_point, qmin, qmax):
        return torch.empty_like(x)

    @torch.library.custom_op("quanttune::dequantize_weight", mutates_args=())
    def dequantize_weight(
        codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int
    ) -> torch.Tensor:
        if scale.dim():
            shape = [1] * codes.dim()
            shape[axis] = -1
            scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
        return (codes.float() - zero_point.float()) * scale

    @dequantize_weight.register_fake
    def _(codes, scale, zero_point, axis):
        return torch.empty(codes.shape, dtype=torch.float32, device=codes.device)

    _OPS.update(qdq=quantize_dequantize, dq=dequantize_weight)
    return _OPS


def quantize_dequantize(x: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int) -> torch.Tensor:
    """`quanttune::quantize_dequantize` (see `TRACE_LOCK` for the lock)."""
    with TRACE_LOCK:
        return qdq_ops()["qdq"](x, scale, zero_point, qmin, qmax)


def translations() -> dict[Any, Any]:
    """ONNX translations of the two custom ops (onnxscript functions, traced at export)."""
    from onnxscript import ir
    from onnxscript import opset18 as op

    qdq_ops()

    def quantize_dequantize(x, scale: float, zero_point: int, qmin: int, qmax: int):
        dtype = ir.DataType.INT8 if qmin < 0 else ir.DataType.UINT8
        s = op.Constant(value=ir.tensor(scale, dtype=ir.DataType.FLOAT))
        z = op.Constant(value=ir.tensor(zero_point, dtype=dtype))
        q = op.QuantizeLinear(x, s, z)
        full = (-128, 127) if qmin < 0 else (0, 255)
        if (qmin, qmax) != full:  # symmetric INT8 uses [-127, 127]; QuantizeLinear saturates at -128
            low, high = ir.tensor(qmin, dtype=dtype), ir.tensor(qmax, dtype=dtype)
            q = op.Clip(q, op.Constant(value=low), op.Constant(value=high))
        return op.DequantizeLinear(q, s, z)

    def dequantize_weight(codes, scale, zero_point, axis: int):
        # the zero point is explicit: ONNX Runtime's Gemm QDQ fusion requires it
        return op.DequantizeLinear(codes, scale, zero_point, axis=axis)

    ops = torch.ops.quanttune
    return {ops.quantize_dequantize.default: quantize_dequantize, ops.dequantize_weight.default: dequantize_weight}
