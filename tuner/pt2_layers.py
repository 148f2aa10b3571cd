"""Real layers in an unlifted torch.export module: every `aten.linear` / `aten.conv1d|2d|3d` /
`aten.convolution` / `aten.embedding` call on parameters becomes a call of an `nn.Linear` /
`nn.ConvNd` / `nn.Embedding` submodule at the eager model's qualified name, holding the same
parameter objects (an embedding keeps its `padding_idx`)."""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import fx, nn

_FQN = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")
_LINEAR = torch.ops.aten.linear.default
_CONVOLUTION = torch.ops.aten.convolution.default
_EMBEDDING = torch.ops.aten.embedding.default
_CONV_DIMS = {
    torch.ops.aten.conv1d.default: 1, torch.ops.aten.conv1d.padding: 1,
    torch.ops.aten.conv2d.default: 2, torch.ops.aten.conv2d.padding: 2,
    torch.ops.aten.conv3d.default: 3, torch.ops.aten.conv3d.padding: 3,
}
_CONV_CLASSES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_MODULE_ATTRS = frozenset(vars(nn.Module()))
_LAYER_CLASS_NAMES = frozenset(
    f"{c.__module__}.{c.__qualname__}" for c in (nn.Linear, nn.Embedding, *_CONV_CLASSES.values())
)


def _is_layer_call(node: fx.Node) -> bool:
    return node.op == "call_function" and (
        node.target is _LINEAR or node.target is _CONVOLUTION or node.target is _EMBEDDING or node.target in _CONV_DIMS
    )


def materialize_layers(gm: fx.GraphModule) -> list[str]:
    """Replace every linear/conv/embedding call on parameters by a call of a real layer module;
    returns why the calls it left alone were left alone."""
    graph = gm.graph
    made: dict[str, tuple[nn.Module, tuple[Any, ...]]] = {}
    skipped: list[str] = []
    for node in list(graph.nodes):
        if _decomposed_linear(gm, node):
            skipped.append(f"{node.name}: a linear decomposed to {node.target.__name__} (export without run_decompositions())")
            continue
        if not _is_layer_call(node):
            continue
        args = _bind(node)
        weight, bias = _parameter(gm, args["weight"]), _parameter(gm, args.get("bias"))
        if weight is None or (args.get("bias") is not None and bias is None):
            skipped.append(f"{node.name}: its weight or bias is not a parameter")
            continue
        name = _layer_name(node, args["weight"].target)
        layer = _build(node.target, args, weight, bias) if name else None
        if layer is None:
            skipped.append(f"{node.name}: not an ordinary layer (weight {args['weight'].target!r})")
            continue
        key = _config(layer)
        if name in made:
            if made[name][1] != key:
                skipped.append(f"{node.name}: {name!r} is called with different settings")
                continue
        elif not _install(gm, name, layer):
            skipped.append(f"{node.name}: {name!r} is already taken by other state")
            continue
        else:
            made[name] = (layer, key)
        with graph.inserting_before(node):
            call = graph.call_module(name, (args["indices" if node.target is _EMBEDDING else "input"],))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        graph.erase_node(node)
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    _reroute_layer_state(gm, set(made))
    graph.lint()
    gm.recompile()
    return skipped


def _reroute_layer_state(gm: fx.GraphModule, layers: set[str]) -> None:
    """Point the graph's other reads of a layer's tensors (a tied embedding reading the head's
    weight) at a path outside every layer, so that they keep reading the FP32 tensor when
    `apply_plan` swaps the layer for a QuantizedLayer."""
    outside: dict[int, str] = {}
    for fqn, tensor in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]:
        if fqn.rpartition(".")[0] not in layers:
            outside.setdefault(id(tensor), fqn)
    for node in gm.graph.nodes:
        if node.op != "get_attr" or node.target.rpartition(".")[0] not in layers:
            continue
        owner, _, attr = node.target.rpartition(".")
        value = getattr(gm.get_submodule(owner), attr)
        if id(value) not in outside:
            alias = "_layer_state_" + node.target.replace(".", "_")
            if isinstance(value, nn.Parameter):
                gm.register_parameter(alias, value)
            elif attr in gm.get_submodule(owner)._buffers:
                gm.register_buffer(alias, value)
            else:
                setattr(gm, alias, value)
            outside[id(value)] = alias
        node.target = outside[id(value)]


def _decomposed_linear(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A core-ATen linear: addmm/mm of an input and a transposed parameter."""
    if node.op != "call_function" or node.target not in (torch.ops.aten.addmm.default, torch.ops.aten.mm.default):
        return False
    mat2 = node.args[2] if node.target is torch.ops.aten.addmm.default else node.args[1]
    return (isinstance(mat2, fx.Node) and mat2.op == "call_function"
            and mat2.target in (torch.ops.aten.permute.default, torch.ops.aten.t.default)
            and _parameter(gm, mat2.args[0]) is not None)


def _bind(node: fx.Node) -> dict[str, Any]:
    """The call's arguments by schema name, defaults filled in."""
    values: dict[str, Any] = {}
    for i, argument in enumerate(node.target._schema.arguments):
        if i < len(node.args):
            values[argument.name] = node.args[i]
        elif argument.name in node.kwargs:
            values[argument.name] = node.kwargs[argument.name]
        elif argument.has_default_value():
            values[argument.name] = argument.default_value
    return values


def _parameter(gm: fx.GraphModule, value: Any) -> nn.Parameter | None:
    if not (isinstance(value, fx.Node) and value.op == "get_attr"):
        return None
    try:
        return gm.get_parameter(value.target)
    except AttributeError:
        return None


def _layer_name(node: fx.Node, weight_fqn: str) -> str | None:
    """The eager model's name for the layer: the innermost module of the call when that module owns
    the weight or is a Linear/Conv (tied weights), else the module owning the weight."""
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path, kind = list(stack.values())[-1]
        kind = kind if isinstance(kind, str) else f"{kind.__module__}.{kind.__qualname__}"
        if path and _FQN.fullmatch(path) and (weight_fqn == f"{path}.weight" or kind in _LAYER_CLASS_NAMES):
            return path
    return weight_fqn[: -len(".weight")] if weight_fqn.endswith(".weight") else None


def _ints(value: Any, dims: int) -> Any:
    if isinstance(value, str):
        return value
    value = [value] if isinstance(value, int) else list(value)
    return tuple(value * dims if len(value) == 1 else value)


def _build(target: Any, args: dict[str, Any], weight: nn.Parameter, bias: nn.Parameter | None) -> nn.Module | None:
    if target is _EMBEDDING:
        if weight.dim() != 2:
            return None
        padding_idx = args["padding_idx"]  # F.embedding passes -1 for none, else a row index >= 0
        layer = nn.Embedding(weight.shape[0], weight.shape[1], padding_idx=None if padding_idx < 0 else padding_idx,
                             scale_grad_by_freq=args["scale_grad_by_freq"], sparse=args["sparse"], device="meta")
        layer.weight = weight
        return layer
    if target is _LINEAR:
        if weight.dim() != 2:
            return None
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    else:
        if target is _CONVOLUTION:
            if args["transposed"]:
                return None
            dims = weight.dim() - 2
        else:
            dims = _CONV_DIMS[target]
        if dims not in _CONV_CLASSES or weight.dim() != dims + 2:
            return None
        groups = args["groups"]
        try:
            layer = _CONV_CLASSES[dims](
                weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]),
                stride=_ints(args["stride"], dims), padding=_ints(args["padding"], dims),
                dilation=_ints(args["dilation"], dims), groups=groups, bias=bias is not None, device="meta",
            )
        except (ValueError, TypeError):
            return None
    layer.weight = weight
    if bias is not None:
        layer.bias = bias
    return layer


def _config(layer: nn.Module) -> tuple[Any, ...]:
    if isinstance(layer, nn.Embedding):
        return ("embedding", id(layer.weight), layer.padding_idx, layer.scale_grad_by_freq, layer.sparse)
    if isinstance(layer, nn.Linear):
        return ("linear", id(layer.weight), id(layer.bias))
    return (type(layer).__name__, id(layer.weight), id(layer.bias), layer.stride, layer.padding, layer.dilation, layer.groups)


def _same_view(a: Any, b: Any) -> bool:
    """True when two tensors are views of the same memory with the same layout."""
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.data_ptr() == b.data_ptr()
            and a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride())


def _install(gm: fx.GraphModule, name: str, layer: nn.Module) -> bool:
    """Put `layer` at `name`. The unlifted module holds parameters in plain nn.Module containers;
    the layer takes over the container's other state so that every other access still resolves."""
    parent_name, _, child = name.rpartition(".")
    parent: nn.Module = gm
    for part in parent_name.split(".") if parent_name else []:
        if part not in parent._modules:
            if hasattr(parent, part):
                return False
            parent.add_module(part, nn.Module())
        parent = parent._modules[part]
    old = parent._modules.get(child)
    if old is None:
        if hasattr(parent, child):
            return False
    else:
        if type(old) is not nn.Module or old._buffers.keys() & {"weight", "bias"}:
            return False
        for attr in ("weight", "bias"):
            if attr in old._parameters and old._parameters[attr] is not getattr(layer, attr):
                # a loaded archive unties tied weights into parameters sharing one storage (an
                # embedding read through its output head's weight): keep the container's own
                if not _same_view(old._parameters[attr], getattr(layer, attr)):
                    return False
                setattr(layer, attr, old._parameters[attr])
        for attr, value in old._parameters.items():
            if attr not in ("weight", "bias"):
                layer.register_parameter(attr, value)
        for attr, value in old._buffers.items():
            layer.register_buffer(attr, value, persistent=attr not in old._non_persistent_buffers_set)
        for attr, value in old._modules.items():
            layer.add_module(attr, value)
        for attr, value in vars(old).items():  # lifted constants are plain attributes
            if attr not in _MODULE_ATTRS:
                if attr in vars(layer):
                    return False
                object.__setattr__(layer, attr, value)
    setattr(parent, child, layer)
    return True
