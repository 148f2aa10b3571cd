"""What ONNX Runtime runs for a BERT-style encoder (the MiniLM bench case in small): every INT8
Linear an INT8 kernel, attention's two activation MatMuls kept float (measured faster than
quantizing them, README), no SkipLayerNormalization fusion, and deployment equal to simulation."""

from collections import Counter

import onnx
import torch
from torch import nn
from torch.nn import functional as F

from tuner import LayerConfig, apply_plan, calibrate, check_kernels, export_onnx, load_onnx
from tuner.onnx_kernels import optimized_graph

HEADS, DIM = 4, 32


class BertLayer(nn.Module):
    """Hugging Face's BertLayer with its default SDPA attention: Q/K/V Linears, heads split by
    view/transpose, `scaled_dot_product_attention` with an additive mask, output Linear, residual
    Add + LayerNorm, GELU feed-forward, residual Add + LayerNorm."""

    def __init__(self):
        super().__init__()
        self.query, self.key, self.value = nn.Linear(DIM, DIM), nn.Linear(DIM, DIM), nn.Linear(DIM, DIM)
        self.attention_output, self.norm1 = nn.Linear(DIM, DIM), nn.LayerNorm(DIM)
        self.intermediate, self.output, self.norm2 = nn.Linear(DIM, 4 * DIM), nn.Linear(4 * DIM, DIM), nn.LayerNorm(DIM)

    def heads(self, x):
        return x.view(x.shape[0], x.shape[1], HEADS, DIM // HEADS).transpose(1, 2)

    def forward(self, h, mask):
        q, k, v = self.heads(self.query(h)), self.heads(self.key(h)), self.heads(self.value(h))
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(h.shape)
        h = self.norm1(self.attention_output(context) + h)
        return self.norm2(self.output(F.gelu(self.intermediate(h))) + h)


class TinyBert(nn.Module):
    def __init__(self, vocab: int = 100, layers: int = 2):
        super().__init__()
        self.embeddings = nn.Embedding(vocab, DIM)
        self.layers = nn.ModuleList(BertLayer() for _ in range(layers))

    def forward(self, input_ids, attention_mask):
        h = self.embeddings(input_ids)
        mask = (1.0 - attention_mask[:, None, None, :].to(h.dtype)) * torch.finfo(h.dtype).min
        for layer in self.layers:
            h = layer(h, mask)
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return F.normalize((h * m).sum(1) / m.sum(1), dim=-1)


def _batches(n: int, batch: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 6 + 2 * i
        lengths = torch.randint(2, length + 1, (batch, 1), generator=g)
        mask = (torch.arange(length)[None, :] < lengths).long()
        out.append((torch.randint(1, 100, (batch, length), generator=g) * mask, mask))
    return out


def _activation_matmuls(graph: onnx.GraphProto) -> Counter:
    """Kernels of the MatMuls whose both operands are activations (a weight's reads an initializer)."""
    weights = {i.name for i in graph.initializer}
    matmuls = {"MatMul": 1, "FusedMatMul": 1, "MatMulIntegerToFloat": 1, "MatMulInteger": 1, "QLinearMatMul": 3}
    return Counter(n.op_type for n in graph.node if n.op_type in matmuls and n.input[matmuls[n.op_type]] not in weights)


def test_a_bert_encoder_runs_every_int8_linear_in_int8_and_deploys_as_simulated(tmp_path):
    torch.manual_seed(0)
    model = TinyBert().eval()
    batches = _batches(3)
    calibration = calibrate(model, batches)
    plan = calibration.uniform_plan(LayerConfig(activation="mse", weights="per_channel"))
    path = export_onnx(model, plan, calibration, tmp_path / "bert.onnx")

    check = check_kernels(path, {n: i.macs for n, i in calibration.layers.items()})
    assert len(check.planned_int8) == 13 and check.running_int8 == check.planned_int8  # 12 Linears, the embedding
    assert {check.layers[n].kernel for n in check.planned_int8} == {"MatMulIntegerToFloat", "Gather"}
    graph = optimized_graph(path, tmp_path).graph
    ops = Counter(n.op_type for n in graph.node)
    assert _activation_matmuls(graph) == {"FusedMatMul": 2, "MatMul": 2}  # Q.K^T (scale fused) and weights.V, float
    assert ops["SkipLayerNormalization"] == 0 and ops["LayerNormalization"] == 4

    simulated, deployed = apply_plan(model, plan, calibration), load_onnx(path, threads=1)
    test = _batches(2, batch=5, seed=7)[1]  # a batch size and length never seen at export
    with torch.no_grad():
        want, got, fp32 = simulated(*test), deployed(*test), model(*test)
    assert (want - fp32).abs().max() > 1e-3  # quantization changes the output ...
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)  # ... and ONNX Runtime computes what we simulate


def test_shapes_in_the_file_would_make_onnx_runtime_fuse_skip_layer_normalization(tmp_path):
    """The export keeps no intermediate shapes (`strip_exporter_metadata`). With them, ONNX Runtime
    fuses bias Add + residual Add + LayerNormalization into SkipLayerNormalization, whose CPU kernel
    made MiniLM take 168 instead of 131 ms at batch 128 (README): this model has the pattern, and our file avoids it."""
    torch.manual_seed(0)
    model = TinyBert(layers=1).eval()
    calibration = calibrate(model, _batches(2))
    path = export_onnx(model, calibration.uniform_plan(), calibration, tmp_path / "bert.onnx")
    proto = onnx.load(path)
    assert not proto.graph.value_info
    shaped = tmp_path / "shaped.onnx"
    onnx.save(onnx.shape_inference.infer_shapes(proto), shaped)
    ops = lambda p: Counter(n.op_type for n in optimized_graph(p, tmp_path).graph.node)  # noqa: E731
    assert ops(path)["SkipLayerNormalization"] == 0
    assert ops(shaped)["SkipLayerNormalization"] >= 1
