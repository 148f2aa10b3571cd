"""The model's dataflow, read once from a torch.export graph: what the INT8 runtime needs beyond
per-layer settings.

ONNX Runtime runs a QDQ convolution as an INT8 kernel (QLinearConv) only when its output goes
straight into a QuantizeLinear (a ReLU or ReLU6 in between is folded away); a Gemm/MatMul may
keep a float output. So for every convolution this module finds:
- a BatchNorm that only it feeds: folded into the convolution before calibration
  (`fold_batchnorm`), so that simulation, report and export all describe the folded conv;
- its output tensor (after a fusable ReLU/ReLU6) and whether that tensor reaches anything other
  than the inputs of quantizable layers (a residual Add, a Concat, a pooling, BatchNorm, SiLU, the
  graph output ...): if so it must be quantized too;
- residual Adds and Concats (joins), whose inputs and output are quantized so the runtime can
  run QLinearAdd / QLinearConcat.

A tensor is quantized where a module returns it (a "site": the module's qualified name), or where
a module's own code returns it from a functional call (`stage2.1/cat`: `tuner.functional`), so the
eager simulation and the export both quantize it with the same op. Data movement between quantized
tensors (a channel shuffle's view/transpose/view, a chunk feeding a Concat) is quantized too, at its
source's scale, so that ONNX Runtime moves uint8 data and runs QLinearConcat between INT8 kernels.
A tensor that no call returns by itself cannot be placed; the reason is kept.
"""

from __future__ import annotations

import copy
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .batches import call_model
from .export_errors import torch_output
from .functional import function_name, site_name
from .onnx_io import FlatModel, InputSpec


LAYER_OPS = {"conv1d", "conv2d", "conv3d", "linear"}
CONV_OPS = {"conv1d", "conv2d", "conv3d"}
BATCHNORM_OPS = {"batch_norm", "_native_batch_norm_legit_no_training"}
# ONNX Runtime folds these into the preceding conv when a QuantizeLinear follows (Relu/Clip fusion)
FUSABLE_OPS = {"relu", "relu_", "hardtanh", "hardtanh_", "relu6"}
# these only move or select data: a quantized tensor stays quantized through them
MOVE_OPS = {
    "max_pool1d", "max_pool2d", "max_pool3d", "flatten", "view", "reshape", "_unsafe_view", "permute",
    "transpose", "squeeze", "unsqueeze", "contiguous", "clone", "alias", "detach", "dropout", "dropout_",
    "feature_dropout", "channel_shuffle", "pixel_shuffle", "expand", "slice", "select", "chunk", "split",
    "getitem", "identity",
}
JOIN_OPS = {"add", "add_", "cat", "concat"}
# a product of two tensors (squeeze-excitation's scale * input): QLinearMul when both inputs are
# INT8 outputs (a join like an Add, but only when every input is quantized anyway)
PRODUCT_OPS = {"mul", "mul_"}
# activations ONNX Runtime runs on uint8 data when their input and output are quantized: Sigmoid
# as QLinearSigmoid, SiLU (exported as x * Sigmoid(x)) as QLinearSigmoid + QLinearMul once the
# sigmoid's own output is quantized too (`tuner.qmodules.QuantizedSiLU`)
QLINEAR_ACTIVATIONS = {"sigmoid", "sigmoid_", "silu", "silu_"}
SILU_OPS = {"silu", "silu_"}


def op_name(node: torch.fx.Node) -> str:
    """`relu_` for `aten.relu_.default`, `getitem` for operator.getitem."""
    if node.op != "call_function":
        return node.op
    target = node.target
    name = getattr(target, "__name__", str(target))
    return name.split(".")[0]


@dataclass
class ConvOutput:
    """Where an INT8 convolution's output is quantized, and why it must be."""

    layer: str
    site: str | None  # module whose output is the conv's (activated) output; None: not placeable
    consumers: list[str] = field(default_factory=list)  # quantizable layers reading it
    others: list[str] = field(default_factory=list)  # anything else reading it (op names)
    reason: str | None = None  # why it cannot be placed


@dataclass
class Join:
    """A residual Add, a Concat or a product: QDQ on its inputs and its output lets the runtime run
    it in INT8 (QLinearAdd, QLinearConcat, QLinearMul)."""

    node: str
    op: str
    inputs: list[str]  # sites of the input tensors
    output: str  # site of the output tensor (after a fusable ReLU)
    producers: list[str]  # per input: the conv layer or join node that produces it ('' for neither)


@dataclass
class SiluCall:
    """An nn.SiLU module's call: the site of its input and what reads its output."""

    source: str
    consumers: list[str] = field(default_factory=list)  # quantizable layers reading its output
    others: list[str] = field(default_factory=list)  # anything else (op names)


@dataclass
class ModelGraph:
    """What `read_graph` learned: BatchNorm folds, conv outputs, joins and every site."""

    folds: dict[str, str] = field(default_factory=dict)  # layer -> BatchNorm module folded into it
    conv_outputs: dict[str, ConvOutput] = field(default_factory=dict)
    joins: list[Join] = field(default_factory=list)
    direct_inputs: dict[str, list[str]] = field(default_factory=dict)  # site -> layers reading it directly
    # site -> the site it only moves data from (max-pooling, reshapes): both take one scale, so the
    # runtime moves int8 data (NhwcMaxPool) instead of dequantizing, moving and requantizing
    same_scale: dict[str, str] = field(default_factory=dict)
    # layer -> the LayerNorm/Linear whose output only it reads: where its SmoothQuant factors may
    # fold (`tuner.smoothing`; `Calibration.smooth_folds` holds the verified ones)
    smooth_producers: dict[str, str] = field(default_factory=dict)
    # data movement between quantized tensors: site -> the site it moves data from (graph order)
    moves: dict[str, str] = field(default_factory=dict)
    # sites returned by a functional call: site -> (module, function, occurrence), for `hook_functional`
    functional: dict[str, tuple[str, str, int]] = field(default_factory=dict)
    parts: set[str] = field(default_factory=set)  # sites that are a split's pieces (one scale for all)
    # nn.SiLU modules: with input and output quantized, a SiLU runs as QLinearSigmoid + QLinearMul
    # once its sigmoid's output is quantized too (`apply_plan` swaps in `QuantizedSiLU`)
    silus: dict[str, SiluCall] = field(default_factory=dict)

    @property
    def sites(self) -> list[str]:
        found = [c.site for c in self.conv_outputs.values() if c.site]
        for join in self.joins:
            found += [*join.inputs, join.output]
        return list(dict.fromkeys([*found, *self.moves]))


class _Scopes:
    """Module-call scopes of an exported graph: which module call returns which tensor."""

    def __init__(self, graph: torch.fx.Graph, functional: bool = True):
        self.members: dict[str, set[torch.fx.Node]] = defaultdict(set)
        self.path: dict[str, str] = {}
        for node in graph.nodes:
            for key, (path, _) in (node.meta.get("nn_module_stack") or {}).items():
                self.members[key].add(node)
                self.path[key] = path.removeprefix(_PREFIX) if path != "model" else ""
        calls: dict[str, int] = defaultdict(int)
        for path in self.path.values():
            calls[path] += 1
        self.calls = calls
        self.functional: dict[str, tuple[str, str, int]] = {}
        self.parts: set[str] = set()
        self._calls_in: dict[tuple[str, str], set[torch.fx.Node]] = defaultdict(set)  # (scope, torch_fn id)
        names: dict[tuple[str, str], tuple[str, str, int]] = {}  # call -> (module, function, occurrence)
        counts: dict[tuple[str, str], int] = defaultdict(int)
        for node in graph.nodes if functional else ():
            key, fn = self._call_of(node)
            if key is None:
                continue
            self._calls_in[(key, fn[0])].add(node)
            if (key, fn[0]) not in names:
                counts[(key, function_name(fn))] += 1
                names[(key, fn[0])] = (self.path[key], function_name(fn), counts[(key, function_name(fn))])
        self._names = names

    def _call_of(self, node: torch.fx.Node) -> tuple[str | None, tuple[str, str] | None]:
        """(innermost module-call scope, export's `torch_fn` id) of a node made by a torch function."""
        stack = list((node.meta.get("nn_module_stack") or {}).keys())
        fn = node.meta.get("torch_fn")
        if node.op != "call_function" or not stack or not fn or self.calls[self.path[stack[-1]]] != 1:
            return None, None
        return stack[-1], fn

    def site_of(self, node: torch.fx.Node) -> str | None:
        """The innermost module, called once, whose call returns exactly `node`'s tensor."""
        stack = list((node.meta.get("nn_module_stack") or {}).keys())
        for key in reversed(stack):
            path = self.path[key]
            if not path or self.calls[path] != 1:  # the model itself, or a module called twice
                continue
            members = self.members[key]
            escaping = {n for n in members if any(u not in members for u in n.users)}
            if escaping == {node}:
                return path
        return self._functional_site(node)

    def _functional_site(self, node: torch.fx.Node) -> str | None:
        """`<module>/<function>[_k]` when `node` is what a functional call in that module's own code
        returns (or one of the pieces of a split/chunk it returns)."""
        key, fn = self._call_of(node)
        if key is None or (key, fn[0]) not in self._names:
            return None
        members = self._calls_in[(key, fn[0])]
        escaping = {n for n in members if any(u not in members for u in n.users)}
        pieces = op_name(node) == "getitem" and all(op_name(n) == "getitem" for n in escaping)
        if escaping != {node} and not pieces:
            return None
        call = self._names[(key, fn[0])]
        site = site_name(*call)
        self.functional[site] = call
        if pieces:
            self.parts.add(site)
        return site


_PREFIX = "model."  # FlatModel's attribute holding the model


def _param_names(program: torch.export.ExportedProgram) -> dict[str, str]:
    sig = program.graph_signature
    return {k: v.removeprefix(_PREFIX) for k, v in {**sig.inputs_to_parameters, **sig.inputs_to_buffers}.items()}


def _layer_of(node: torch.fx.Node, params: dict[str, str], layers: set[str]) -> str | None:
    if op_name(node) not in LAYER_OPS or len(node.args) < 2 or not isinstance(node.args[1], torch.fx.Node):
        return None
    weight = params.get(node.args[1].name, "")
    name = weight[: -len(".weight")] if weight.endswith(".weight") else None
    return name if name in layers else None


def _batchnorm_of(node: torch.fx.Node, params: dict[str, str]) -> str | None:
    """The BatchNorm module of a batch_norm node (from its running mean's name), when that
    BatchNorm runs only here (a shared one cannot be folded into one conv)."""
    for arg in node.args[1:5]:
        if isinstance(arg, torch.fx.Node) and params.get(arg.name, "").endswith(".running_mean"):
            return params[arg.name][: -len(".running_mean")] if len(arg.users) == 1 else None
    return None


def read_graph(model: nn.Module, example: Any, layers: set[str]) -> ModelGraph | None:
    """Export `model` once (on one example batch) and read its dataflow; None when torch.export
    cannot capture it (then nothing is folded and only layer inputs are quantized)."""
    try:
        spec = InputSpec.from_batch(model, example)
        flat = FlatModel(model, spec)  # flat tensors in and out: any output structure exports
        with torch_output(), torch.no_grad():  # what torch logs while failing: the warning below says it once
            program = torch.export.export(flat, tuple(spec.tensors_of(example)), strict=False)
    except Exception as exc:  # data-dependent control flow and the like
        try:
            with torch.no_grad():
                call_model(model, example)
        except Exception:  # the batch does not run at all: calibration says so, more clearly
            return None
        warnings.warn(f"quanttune could not read {type(model).__name__}'s graph with torch.export "
                      f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}): BatchNorm is "
                      "not folded and only layer inputs are quantized", stacklevel=3)
        return None
    return _analyse(program, layers, model)


def _analyse(program: torch.export.ExportedProgram, layers: set[str], model: nn.Module) -> ModelGraph:
    graph = program.graph
    params = _param_names(program)
    # a torch.export archive's GraphModule runs aten ops whose recorded `torch_fn` names are the
    # original model's: no functional sites there
    scopes = _Scopes(graph, functional=not isinstance(model, torch.fx.GraphModule))
    layer_nodes: dict[str, list[torch.fx.Node]] = defaultdict(list)
    for node in graph.nodes:
        name = _layer_of(node, params, layers)
        if name is not None:
            layer_nodes[name].append(node)
    result = ModelGraph()
    out_node: dict[torch.fx.Node, str] = {}  # the (folded) output node of each conv, by conv layer
    for name, nodes in layer_nodes.items():
        node = nodes[0]
        users = list(node.users)
        if len(nodes) == 1 and len(users) == 1 and op_name(users[0]) in BATCHNORM_OPS:
            bn = _batchnorm_of(users[0], params)
            if bn is not None and _foldable(model, bn):
                result.folds[name] = bn
                node = users[0]
        if op_name(nodes[0]) in CONV_OPS and len(nodes) == 1:
            out_node[node] = name
    for node, name in out_node.items():
        result.conv_outputs[name] = _conv_output(name, node, layer_nodes[name][0], scopes, params, layers)
    result.joins = _joins(graph, scopes, out_node)
    result.silus = _silus(graph, scopes, params, layers, model)
    _moved_sites(graph, scopes, params, layers, result)
    _direct_inputs(graph, scopes, params, layers, result)
    used = set(result.sites)
    result.functional = {s: call for s, call in scopes.functional.items() if s in used}
    result.parts = scopes.parts & used
    result.smooth_producers = fold_candidates(graph, params, {n: c[0] for n, c in layer_nodes.items() if len(c) == 1})
    return result


def _moved_sites(graph: torch.fx.Graph, scopes: _Scopes, params: dict[str, str], layers: set[str],
                 result: ModelGraph) -> None:
    """Data movement from a quantized tensor keeps its scale (`same_scale`); where it leads to an INT8
    layer or a join, each step is quantized too (`moves`), so ONNX Runtime moves uint8 data."""
    sites = set(result.sites)
    joined = {n for n in graph.nodes if op_name(n) in JOIN_OPS}
    for node in graph.nodes:
        site = scopes.site_of(node) if op_name(node) in MOVE_OPS else None
        if site is None:
            continue
        source = node.args[0]
        while isinstance(source, torch.fx.Node):
            origin = scopes.site_of(source)
            if origin in sites and origin != site:
                break
            source = source.args[0] if op_name(source) in MOVE_OPS and source.args else None
        else:
            continue
        if site not in sites and not _leads_to_int8(node, params, layers, joined, scopes, sites):
            continue
        result.same_scale[site] = origin
        if site not in sites:
            result.moves[site] = origin
            sites.add(site)


def _leads_to_int8(node: torch.fx.Node, params: dict[str, str], layers: set[str], joined: set[torch.fx.Node],
                   scopes: _Scopes, sites: set[str]) -> bool:
    """Whether `node`'s tensor reaches, through data movement only, a layer, a join or a site."""
    return any(_layer_of(user, params, layers) is not None or user in joined or scopes.site_of(user) in sites
               for user in _users_through_moves(node, params, layers))


def _users_through_moves(node: torch.fx.Node, params: dict[str, str], layers: set[str]):
    """Every node reading `node`'s tensor directly or through data movement (once each)."""
    todo, seen = list(node.users), set()
    while todo:
        user = todo.pop()
        if user in seen:
            continue
        seen.add(user)
        yield user
        if _layer_of(user, params, layers) is None and op_name(user) in MOVE_OPS:
            todo.extend(user.users)


def _activated(node: torch.fx.Node) -> torch.fx.Node:
    """`node`, or the fusable ReLU/ReLU6 that is its only user."""
    users = list(node.users)
    if len(users) == 1 and op_name(users[0]) in FUSABLE_OPS and _clips_at_zero(users[0]):
        return users[0]
    return node


def _clips_at_zero(node: torch.fx.Node) -> bool:
    if op_name(node).startswith("hardtanh"):
        low = node.args[1] if len(node.args) > 1 else node.kwargs.get("min_val", -1.0)
        return low == 0
    return True


def _readers(node: torch.fx.Node, params: dict[str, str], layers: set[str]) -> tuple[list[str], list[str]]:
    """Quantizable layers that read `node`'s tensor (through data movement) and everything else."""
    consumers, others = [], []
    for user in _users_through_moves(node, params, layers):
        layer = _layer_of(user, params, layers)
        if layer is not None:
            consumers.append(layer)
        elif op_name(user) not in MOVE_OPS:
            others.append("graph output" if user.op == "output" else op_name(user))
    return consumers, others


def _conv_output(name: str, node: torch.fx.Node, call: torch.fx.Node, scopes: _Scopes, params: dict[str, str],
                 layers: set[str]) -> ConvOutput:
    """`node` is the conv's output (its folded BatchNorm's, when folded), `call` the conv call."""
    activated = _activated(node)
    consumers, others = _readers(activated, params, layers)
    site = scopes.site_of(activated)
    for earlier in (node, call):  # else before the activation, else at the conv itself: still INT8
        site = site or scopes.site_of(earlier)
    reason = None if site else "no module returns this convolution's output by itself"
    return ConvOutput(name, site, consumers, others, reason)


def _joins(graph: torch.fx.Graph, scopes: _Scopes, out_node: dict[torch.fx.Node, str]) -> list[Join]:
    """The joins in graph order; an activation with a uint8 kernel passes its input's producer on
    (a SiLU on an INT8 conv's output feeds squeeze-excitation's product as an INT8 tensor)."""
    producer: dict[torch.fx.Node, str] = {}
    for node, name in out_node.items():
        producer[node] = name
        producer[_activated(node)] = name
    joins = []
    for node in graph.nodes:
        op = op_name(node)
        if op in QLINEAR_ACTIVATIONS and isinstance(node.args[0], torch.fx.Node) and node.args[0] in producer:
            producer[node] = producer[node.args[0]]
        if op not in JOIN_OPS | PRODUCT_OPS:
            continue
        inputs = list(node.args[0]) if op in ("cat", "concat") else list(node.args[:2])
        if len(inputs) < 2 or not all(isinstance(i, torch.fx.Node) for i in inputs):
            continue  # adding a constant: nothing to run in INT8
        output = _activated(node)
        sites = [scopes.site_of(i) for i in inputs]
        out_site = scopes.site_of(output)
        if None in sites or out_site is None:
            continue
        for t in (node, output):
            producer[t] = node.name
        joins.append(Join(node.name, op, sites, out_site, [producer.get(i, "") for i in inputs]))
    return joins


def _silus(graph: torch.fx.Graph, scopes: _Scopes, params: dict[str, str], layers: set[str],
           model: nn.Module) -> dict[str, SiluCall]:
    """Every nn.SiLU module's call on a tensor with a site (`ModelGraph.silus`)."""
    modules = dict(model.named_modules())
    found = {}
    for node in graph.nodes:
        if op_name(node) not in SILU_OPS or not isinstance(node.args[0], torch.fx.Node):
            continue
        site, source = scopes.site_of(node), scopes.site_of(node.args[0])
        if site and source and isinstance(modules.get(site), nn.SiLU):
            found[site] = SiluCall(source, *_readers(node, params, layers))
    return found


def _direct_inputs(graph: torch.fx.Graph, scopes: _Scopes, params: dict[str, str], layers: set[str],
                   result: ModelGraph) -> None:
    """For each site: the layers whose data input is exactly that tensor (they can share its scale)."""
    result.direct_inputs = {site: [] for site in result.sites}
    for node in graph.nodes:
        layer = _layer_of(node, params, layers)
        source = node.args[0] if layer is not None else None
        if isinstance(source, torch.fx.Node):
            site = scopes.site_of(source)
            if site in result.direct_inputs:
                result.direct_inputs[site].append(layer)


# -- BatchNorm folding -----------------------------------------------------------------------


def _foldable(model: nn.Module, bn: str) -> bool:
    """A real BatchNorm module, or (in a torch.export archive's GraphModule) a batch_norm call
    on parameters that the graph holds once."""
    return isinstance(model.get_submodule(bn), nn.modules.batchnorm._BatchNorm) or _graph_call(model, bn) is not None


def _graph_call(model: nn.Module, bn: str) -> torch.fx.Node | None:
    """The one eval-mode `aten.batch_norm` call of a GraphModule reading `<bn>.running_mean`."""
    if not isinstance(model, torch.fx.GraphModule):
        return None
    calls = [n for n in model.graph.nodes if n.op == "call_function" and op_name(n) == "batch_norm"
             and getattr(n.args[3], "target", None) == f"{bn}.running_mean" and n.args[5] is False]
    return calls[0] if len(calls) == 1 else None


def _batchnorm_numbers(model: nn.Module, bn: str) -> tuple[torch.Tensor, ...]:
    """(running mean, running variance, gamma, beta, eps) of a BatchNorm module or graph call."""
    module = model.get_submodule(bn)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        mean, var, eps = module.running_mean, module.running_var, module.eps
    else:
        call = _graph_call(model, bn)
        mean, var, eps = model.get_buffer(f"{bn}.running_mean"), model.get_buffer(f"{bn}.running_var"), call.args[7]
    gamma = getattr(module, "weight", None)
    beta = getattr(module, "bias", None)
    return (mean, var, gamma if gamma is not None else torch.ones_like(mean),
            beta if beta is not None else torch.zeros_like(mean), eps)


def _drop_batchnorm(model: nn.Module, bn: str) -> None:
    """Take the folded BatchNorm out of the model: an Identity module, or its call out of the graph."""
    if isinstance(model.get_submodule(bn), nn.modules.batchnorm._BatchNorm):
        parent, _, child = bn.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, nn.Identity())
        return
    call = _graph_call(model, bn)
    call.replace_all_uses_with(call.args[0])
    model.graph.erase_node(call)
    model.recompile()


@torch.no_grad()
def fold_batchnorm(model: nn.Module, folds: dict[str, str]) -> nn.Module:
    """A copy of `model` with each BatchNorm in `folds` folded into its conv/linear (eval-mode
    statistics) and replaced by `nn.Identity`; the caller's model is not modified."""
    folded = copy.deepcopy(model)
    for layer_name, bn_name in folds.items():
        layer = folded.get_submodule(layer_name)
        mean, var, gamma, beta, eps = _batchnorm_numbers(folded, bn_name)
        if mean is None:  # batch statistics at inference: nothing fixed to fold
            continue
        factor = gamma / torch.sqrt(var + eps)
        weight = layer.weight * factor.reshape(-1, *([1] * (layer.weight.dim() - 1)))
        bias = layer.bias if layer.bias is not None else torch.zeros_like(mean)
        layer.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        layer.bias = nn.Parameter(((bias - mean) * factor + beta).detach().clone(), requires_grad=False)
        _drop_batchnorm(folded, bn_name)
    return folded.eval()


# -- producers a SmoothQuant factor can be folded into (tuner.smoothing applies the folds) ----------

# ops whose output channel c depends on channel c of one argument alone, positively homogeneously
# (op -> the index of that argument; not ReLU6/hardtanh: clipping at 6 does not scale); `select`/`slice`
# along the channel axis are caught by the check. A BatchNorm is passed only because calibration folds
# it into the conv before it (an unfolded one changes the output, and the check drops that fold).
_CARRY = {**{op: 0 for op in MOVE_OPS - {"getitem"}}, "relu": 0, "relu_": 0,
          **{op: 0 for op in BATCHNORM_OPS}, "scaled_dot_product_attention": 2, "matmul": 1, "bmm": 1}
# Folding into a convolution is cross-layer equalization with data-aware factors: conv -> ReLU -> conv
# takes the second conv's SmoothQuant factors into the first one's output channels, and the second
# conv's input quantizer is then the first one's output quantizer (`Calibration.div_free`).
_PRODUCERS = {"linear", "layer_norm", *CONV_OPS}


def fold_candidates(graph: torch.fx.Graph, params: dict[str, str], calls: dict[str, torch.fx.Node]) -> dict[str, str]:
    """For each layer (its one call node in `calls`): the module producing its input when only
    that layer reads the producer's output, through channel-carrying ops."""
    found = {}
    for layer, call in calls.items():
        producer, path = _producer(call.args[0] if call.args else None, params)
        if producer is not None and _only_reader(path[-1], call, set(path)):
            found[layer] = producer
    return found


def _producer(node: Any, params: dict[str, str]) -> tuple[str | None, list[torch.fx.Node]]:
    path = []
    while isinstance(node, torch.fx.Node) and node.op == "call_function":
        path.append(node)
        op = op_name(node)
        if op in _PRODUCERS:
            weight = node.args[2] if op == "layer_norm" else node.args[1]
            name = params.get(weight.name, "") if isinstance(weight, torch.fx.Node) else ""
            return (name[: -len(".weight")] if name.endswith(".weight") else None), path
        if op not in _CARRY or len(node.args) <= _CARRY[op]:
            break
        node = node.args[_CARRY[op]]
    return None, path


def _only_reader(producer: torch.fx.Node, call: torch.fx.Node, path: set[torch.fx.Node]) -> bool:
    """Whether every use of `producer`'s output goes along `path` into `call`'s data input."""
    todo = [producer]
    while todo:
        node = todo.pop()
        for user in node.users:
            if user is call and call.args[0] is node:
                continue
            if user not in path or op_name(user) not in _CARRY or user.args[_CARRY[op_name(user)]] is not node:
                return False
            todo.append(user)
    return True
