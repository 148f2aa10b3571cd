"""Models as `torch.export` archives (.pt2): export a user's nn.Module, load an uploaded archive.

    export_model(model, batch, "model.pt2")   # client side: the batch dimension (and a token
                                              # input's sequence dimension) is exported dynamic
    model = load_exported("model.pt2")        # server side: an nn.Module the tuner can quantize

`torch.export.load(path).module()` runs every Linear/Conv as an `aten.linear`/`aten.conv2d` call on
a parameter, so `quantizable_layers` finds nothing in it. `load_exported` turns each such call back
into a real `nn.Linear`/`nn.ConvNd` submodule at the original qualified name (`encoder.layer.0.
attention.self.query`), holding the original parameters: calibration, plans and `apply_plan` then
work on it exactly as on the eager model, with the same layer names.

Safety. `torch.export.load` is NOT safe on untrusted files (its own docstring says so). Verified in
torch 2.13: it unpickles with `weights_only=False` any weight or constant whose archive config says
`use_pickle`, and "opaque" constants with plain `pickle.loads`; it falls back to
`torch.load(weights_only=False)` when the sample inputs fail the weights-only loader; it
dlopen()s AOTInductor shared libraries packed in the archive; it parses symbolic shape expressions
with `sympy.sympify` (which evals its string); and `ExportedProgram.module()` exec()s the archive's
`guards_code` strings and formats parameter names into generated Python source. So
`load_exported` first reads the file once into memory and checks it (`check_archive`): only the
entries `torch.export.save` writes, no pickled payloads, sample inputs that load with
`weights_only=True`, only ATen operators (and the few Python symbolic-shape operators), shape
expressions made of sympy constructors and numbers only, names that are plain identifiers. Only
then does torch deserialize those same bytes, and the module is built with `check_guards=False`,
so guard strings are never executed. Anything refused raises `InvalidArchiveError` naming the file.
"""

from __future__ import annotations

import ast
import inspect
import io
import json
import keyword
import math
import operator
import re
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn
from torch.export import Dim
from torch.utils import _pytree as pytree

from .errors import InvalidArgumentError


class InvalidArchiveError(InvalidArgumentError):
    """A file is not a torch.export archive that quanttune accepts; the message says why."""


# -- export (client side) ------------------------------------------------------------------------


def export_model(model: nn.Module, example_batch: Any, path: str | Path, *, dynamic_batch: bool = True) -> Path:
    """Export `model` with `torch.export` on one batch (a tensor, a tuple/list of positional inputs
    or a dict of keyword inputs) and save it to `path` (a `.pt2` file). The model is exported in
    eval mode (dropout off, batch-norm running statistics), which the archive then keeps.

    With `dynamic_batch` the leading dimension of every tensor input is dynamic, and so is the
    sequence dimension (dim 1) of integer token inputs such as `input_ids`/`attention_mask`. When
    the model does not export that way the next more static variant is tried (batch only, then fully
    static) and a warning says so: the archive then only accepts those exact shapes.
    """
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(f"`model` must be a torch.nn.Module, but got {type(model).__name__}.")
    path = Path(path)
    if path.suffix != ".pt2":
        raise InvalidArgumentError(f"`path` must name a .pt2 file (torch.export's archive format), but got {str(path)!r}.")
    args, kwargs = _split_batch(example_batch)
    attempts: list[tuple[str, Any]] = []
    if dynamic_batch:
        with_seq, batch_only = _dynamic_shapes(args, kwargs, seq=True), _dynamic_shapes(args, kwargs, seq=False)
        if with_seq != batch_only:
            attempts.append(("batch and sequence dimensions dynamic", with_seq))
        attempts.append(("batch dimension dynamic", batch_only))
    attempts.append(("static shapes", None))

    was_training = model.training
    model.eval()
    failures: list[str] = []
    try:
        for how, shapes in attempts:
            # fresh tensor objects each time: export marks the ones it is given as dynamic
            fresh_args, fresh_kwargs = pytree.tree_map_only(torch.Tensor, torch.Tensor.detach, (args, kwargs))
            try:
                program = torch.export.export(model, fresh_args, fresh_kwargs, dynamic_shapes=shapes)
                break
            except Exception as error:  # torch raises many unrelated types here
                reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
                if shapes is None:
                    raise InvalidArgumentError(f"torch.export could not export the model: {reason}") from error
                failures.append(f"with {how}: {reason}")
    finally:
        model.train(was_training)
    if failures:
        hint = " (the example batch has batch size 1: export with 2 or more)" if _batch_of(args, kwargs) == 1 else ""
        warnings.warn(
            f"exported {str(path)!r} with {how} only{hint}; the archive accepts only those shapes. "
            f"torch.export failed {'; '.join(failures)}",
            UserWarning,
            stacklevel=2,
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, path)
    return path


def _split_batch(batch: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(batch, Mapping):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    return (batch,), {}


def _batch_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim()]
    return tensors[0].shape[0] if tensors else None


def _dynamic_shapes(args: tuple[Any, ...], kwargs: dict[str, Any], *, seq: bool) -> Any:
    """Per input: dim 0 dynamic; with `seq`, also dim 1 of integer token inputs (2-D int/bool
    [batch, seq], e.g. input_ids) and of every other input whose dim 1 has that length."""
    leaves = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    tokens = {t.shape[1] for t in leaves if t.dim() == 2 and t.dtype in (torch.int64, torch.int32, torch.bool)}
    seq_len = next(iter(tokens)) if seq and len(tokens) == 1 else None

    def spec(x: Any) -> Any:
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            return None
        dims = {0: Dim.DYNAMIC}
        if seq_len is not None and x.dim() >= 2 and x.shape[1] == seq_len:
            dims[1] = Dim.DYNAMIC
        return dims

    if kwargs:
        return {name: pytree.tree_map(spec, value) for name, value in kwargs.items()}
    return tuple(pytree.tree_map(spec, value) for value in args)


# -- archive checks (before torch reads a byte) -------------------------------------------------

_ENTRIES = re.compile(
    r"archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id|models/model\.json"
    r"|data/weights/model_weights_config\.json|data/weights/weight_\d+"
    r"|data/constants/model_constants_config\.json|data/constants/tensor_\d+"
    r"|data/sample_inputs/model\.pt|extra/[A-Za-z0-9_.-]+"
)
_REQUIRED = ("archive_format", "models/model.json", "data/weights/model_weights_config.json",
             "data/constants/model_constants_config.json", "data/sample_inputs/model.pt")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_FQN = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")
_SYMBOL = re.compile(r"[a-z]+[0-9]+")  # shape symbols: s0, u3, s53

# Python callables the exporter emits for symbolic-shape arithmetic, as the archive names them.
_PY_TARGETS = frozenset(
    f"{f.__module__}.{f.__name__}"
    for f in (operator.getitem, operator.eq, operator.ne, operator.le, operator.ge, operator.lt, operator.gt,
              operator.neg, operator.pos, operator.mul, operator.add, operator.sub, operator.floordiv,
              operator.mod, operator.pow, operator.truediv, operator.and_, operator.or_, operator.lshift,
              operator.rshift, math.trunc, torch.sym_not, torch.sym_int, torch.sym_float, torch.sym_ite,
              torch.sym_max, torch.sym_min, torch.sym_sqrt)
)
_HIGHER_ORDER = frozenset({"wrap_with_set_grad_enabled", "wrap_with_autocast"})
_DENIED_ATEN = frozenset({"from_file"})  # reads a file of the server's disk

# What a serialized shape expression may contain: sympy constructors, the functions torch's
# deserializer provides, numbers and symbol names. Nothing else reaches sympy's eval.
_EXPR_CALLS = frozenset({
    "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Max", "Min", "Mod", "Abs", "floor",
    "ceiling", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "StrictLessThan", "StrictGreaterThan", "LessThan",
    "GreaterThan", "Equality", "Unequality", "And", "Or", "Not", "Piecewise", "ExprCondPair",
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv",
    "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv",
    "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal",
    "ToFloat", "Identity",
})
_EXPR_NAMES = frozenset({"True", "False", "true", "false", "oo", "zoo", "nan"})
_EXPR_KEYWORDS = frozenset({"positive", "negative", "integer", "real", "nonnegative", "nonpositive", "finite",
                            "infinite", "zero", "nonzero", "even", "odd", "rational", "commutative"})
_EXPR_NODES = (ast.Expression, ast.Call, ast.Name, ast.Load, ast.Constant, ast.keyword, ast.BinOp, ast.UnaryOp,
               ast.Compare, ast.BoolOp, ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow,
               ast.USub, ast.UAdd, ast.Not, ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.And, ast.Or)


def check_archive(data: bytes, name: str = "<archive>") -> None:
    """Refuse, with `InvalidArchiveError`, anything but an archive as `torch.export.save` writes it
    whose loading runs no code from the file. Reads `data` only; never unpickles beyond
    `torch.load(weights_only=True)` of the sample inputs."""

    def refuse(why: str) -> InvalidArchiveError:
        return InvalidArchiveError(f"{name!r} is not a torch.export archive quanttune accepts: {why}")

    if not zipfile.is_zipfile(io.BytesIO(data)):
        raise refuse("it is not a .pt2 (zip) file; it may be truncated, or a pickle/torch.save file, which is refused")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            infos = archive.infolist()
            prefixes = {info.filename.split("/", 1)[0] for info in infos}
            if len(prefixes) != 1 or any("/" not in info.filename for info in infos):
                raise refuse("its entries are not under one archive folder as torch.export.save writes them")
            prefix = prefixes.pop() + "/"
            files = {info.filename[len(prefix):]: info for info in infos}
            unexpected = sorted(f for f in files if not _ENTRIES.fullmatch(f))
            if unexpected:
                raise refuse(f"it holds entries torch.export.save does not write (compiled code, pickled objects or "
                             f"another model format): {unexpected[:5]}")
            if any(info.compress_type != zipfile.ZIP_STORED for info in infos):
                raise refuse("its entries are compressed; torch.export.save stores them uncompressed")
            missing = [f for f in _REQUIRED if f not in files]
            if missing:
                raise refuse(f"it lacks {missing}")
            bad = archive.testzip()
            if bad is not None:
                raise refuse(f"entry {bad!r} is corrupt (CRC mismatch)")

            def read(entry: str) -> bytes:
                return archive.read(prefix + entry)

            if read("archive_format") != b"pt2":
                raise refuse("its archive_format is not 'pt2'")
            for kind, folder, pattern in (("weights", "data/weights/", r"weight_\d+"), ("constants", "data/constants/", r"tensor_\d+")):
                config = _json(read(f"{folder}model_{kind}_config.json"), refuse).get("config")
                if not isinstance(config, dict):
                    raise refuse(f"its {kind} config is malformed")
                for fqn, meta in config.items():
                    if not (isinstance(meta, dict) and _FQN.fullmatch(fqn)):
                        raise refuse(f"its {kind} config has a malformed entry {fqn!r}")
                    if meta.get("use_pickle") is not False:
                        raise refuse(f"its {kind[:-1]} {fqn!r} is stored as a pickle, which could run code when loaded")
                    path_name = meta.get("path_name")
                    if not (isinstance(path_name, str) and re.fullmatch(pattern, path_name) and folder + path_name in files):
                        raise refuse(f"its {kind[:-1]} {fqn!r} points at a missing or unexpected file {path_name!r}")
            try:
                with warnings.catch_warnings():  # about pickle protocols, on files we refuse anyway
                    warnings.simplefilter("ignore")
                    torch.load(io.BytesIO(read("data/sample_inputs/model.pt")), weights_only=True, map_location="cpu")
            except Exception as error:
                raise refuse(f"its sample inputs are not plain tensors (weights-only load failed: {type(error).__name__})") from None
            _check_program(_json(read("models/model.json"), refuse), refuse)
    except zipfile.BadZipFile as error:
        raise refuse(f"it is a damaged zip file ({error})") from None


def _json(raw: bytes, refuse) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise refuse(f"a JSON entry does not parse ({error})") from None
    if not isinstance(value, dict):
        raise refuse("a JSON entry is not an object")
    return value


def _check_program(program: dict[str, Any], refuse) -> None:
    """Walk the serialized program: operators, shape expressions and every name that ends up in
    generated Python source or in sympy."""
    for symbol in program.get("range_constraints") or {}:
        if not _SYMBOL.fullmatch(symbol):
            raise refuse(f"it constrains an unexpected shape symbol {symbol!r}")

    def walk(value: Any) -> None:
        if isinstance(value, list):
            for item in value:
                walk(item)
            return
        if not isinstance(value, dict):
            return
        if "target" in value and "inputs" in value and not _allowed_target(value["target"]):
            raise refuse(f"it calls {value['target']!r}, which is not an ATen operator quanttune accepts "
                         "(custom operators, Python callables and compiled code are refused)")
        for key, item in value.items():
            if key == "expr_str" and not (isinstance(item, str) and _safe_expr(item)):
                raise refuse(f"it holds a shape expression that is not plain arithmetic: {str(item)[:80]!r}")
            if key in ("name", "as_name") and isinstance(item, str) and not _IDENT.fullmatch(item):
                raise refuse(f"it holds a value name that is not an identifier: {item[:80]!r}")
            if key in ("parameter_name", "buffer_name", "tensor_constant_name") and not (
                isinstance(item, str) and _FQN.fullmatch(item)
            ):
                raise refuse(f"it holds a state name that is not a dotted identifier: {str(item)[:80]!r}")
            if key in ("custom_obj", "custom_obj_name", "as_custom_obj"):
                raise refuse("it holds a TorchScript custom object, which is loaded by pickling")
            if key == "forward_arg_names" and not (
                isinstance(item, list) and all(isinstance(a, str) and a.isidentifier() and not keyword.iskeyword(a) for a in item)
            ):
                raise refuse(f"its forward argument names are not identifiers: {str(item)[:80]}")
            if key == "fqn" and item and not (isinstance(item, str) and _FQN.fullmatch(item)):
                raise refuse(f"it holds a module name that is not a dotted identifier: {str(item)[:80]!r}")
            walk(item)

    walk(program.get("graph_module"))


def _allowed_target(target: Any) -> bool:
    if not isinstance(target, str):
        return False
    if target in _PY_TARGETS:
        return True
    parts = target.split(".")
    if len(parts) == 4 and parts[:3] == ["torch", "ops", "higher_order"]:
        return parts[3] in _HIGHER_ORDER
    if len(parts) != 5 or parts[:3] != ["torch", "ops", "aten"] or parts[3] in _DENIED_ATEN:
        return False
    packet = getattr(torch.ops.aten, parts[3], None) if _IDENT.fullmatch(parts[3]) else None
    return isinstance(getattr(packet, parts[4], None), torch._ops.OpOverload)


def _safe_expr(text: str) -> bool:
    """Whether a serialized sympy expression (srepr form, e.g. "Mul(Integer(384), Symbol('s53',
    positive=True, integer=True))") is only arithmetic on numbers and shape symbols, with small
    exponents (so that sympy cannot be made to compute a gigantic power either)."""
    if len(text) > 4000:
        return False
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        return False
    powers = 0
    for node in ast.walk(tree):
        if not isinstance(node, _EXPR_NODES):
            return False
        if isinstance(node, ast.Call):
            if not (isinstance(node.func, ast.Name) and node.func.id in _EXPR_CALLS):
                return False
            if any(k.arg not in _EXPR_KEYWORDS for k in node.keywords):
                return False
            if node.func.id in ("Pow", "FloatPow", "PowByNatural"):
                powers += 1
                if len(node.args) != 2 or not _small_exponent(node.args[1]):
                    return False
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
            powers += 1
            if not _small_exponent(node.right):
                return False
        elif isinstance(node, ast.Name):
            if node.id not in _EXPR_CALLS and node.id not in _EXPR_NAMES and not _SYMBOL.fullmatch(node.id):
                return False
        elif isinstance(node, ast.Constant):
            value = node.value
            if isinstance(value, str) and not _SYMBOL.fullmatch(value):
                return False
            if not isinstance(value, (bool, int, float, str)) or (isinstance(value, int) and abs(value) > 10**30):
                return False
    return powers <= 4


def _small_exponent(node: ast.AST) -> bool:
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("Integer", "Rational"):
        return bool(node.args) and all(_small_exponent(arg) for arg in node.args)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        return _small_exponent(node.operand)
    return isinstance(node, ast.Constant) and type(node.value) is int and abs(node.value) <= 8


# -- load (server side) --------------------------------------------------------------------------


def load_exported(path: str | Path) -> nn.Module:
    """Load a torch.export archive into a module that calls like the exported model (same
    positional/keyword inputs, same outputs) and in which every Linear/Conv call on a parameter is a
    real `nn.Linear`/`nn.ConvNd` at its original qualified name. The file is checked before torch
    reads it (see the module docstring); what is refused raises `InvalidArchiveError`.

    `train()`/`eval()` only set flags: dropout and batch-norm behave as in the mode the model was
    exported in.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise InvalidArchiveError(f"cannot read the model archive {str(path)!r}: {error.strerror or error}") from None
    check_archive(data, str(path))
    try:
        program = torch.export.load(io.BytesIO(data))
        module = program.module(check_guards=False)
    except Exception as error:
        raise InvalidArchiveError(
            f"{str(path)!r} looks like a torch.export archive but torch could not load it "
            f"({type(error).__name__}: {str(error).strip()[:300]}); re-export it with this torch version ({torch.__version__})."
        ) from error
    for method in ("train", "eval"):  # ExportedProgram.module() makes both raise; flags are harmless
        module.__dict__.pop(method, None)
    module.register_forward_pre_hook(_as_exported, prepend=True, with_kwargs=True)
    skipped = _materialize_layers(module)
    if skipped:
        warnings.warn(
            f"{len(skipped)} linear/convolution call(s) in {str(path)!r} stay FP32 and cannot be tuned: "
            + "; ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else ""),
            UserWarning,
            stacklevel=2,
        )
    return module.eval()


def _as_exported(module: fx.GraphModule, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Accept the inputs positionally or by keyword, as the eager model did: pass them on the way
    they were exported (torch's own input check insists on that)."""
    names = inspect.signature(module.forward).parameters
    try:
        bound = inspect.signature(module.forward).bind(*args, **kwargs).arguments
    except TypeError as error:
        raise InvalidArgumentError(f"the model takes ({', '.join(names)}): {error}") from None
    values = [bound[name] for name in names if name in bound]
    positional = module._in_spec.child(0).num_children
    return tuple(values[:positional]), dict(zip(list(names)[positional:], values[positional:]))


_LINEAR = torch.ops.aten.linear.default
_CONVOLUTION = torch.ops.aten.convolution.default
_CONV_DIMS = {
    torch.ops.aten.conv1d.default: 1, torch.ops.aten.conv1d.padding: 1,
    torch.ops.aten.conv2d.default: 2, torch.ops.aten.conv2d.padding: 2,
    torch.ops.aten.conv3d.default: 3, torch.ops.aten.conv3d.padding: 3,
}
_CONV_CLASSES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_MODULE_ATTRS = frozenset(vars(nn.Module()))
_LAYER_CLASS_NAMES = frozenset(f"{c.__module__}.{c.__qualname__}" for c in (nn.Linear, *_CONV_CLASSES.values()))


def _materialize_layers(gm: fx.GraphModule) -> list[str]:
    """Replace every linear/conv call on parameters by a call of a real layer module; returns why
    the calls it left alone were left alone."""
    graph = gm.graph
    made: dict[str, tuple[nn.Module, tuple[Any, ...]]] = {}
    skipped: list[str] = []
    for node in list(graph.nodes):
        if _decomposed_linear(gm, node):
            skipped.append(f"{node.name}: a linear decomposed to {node.target.__name__} (export without run_decompositions())")
            continue
        if node.op != "call_function" or not (node.target is _LINEAR or node.target is _CONVOLUTION or node.target in _CONV_DIMS):
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
            call = graph.call_module(name, (args["input"],))
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
    if isinstance(layer, nn.Linear):
        return ("linear", id(layer.weight), id(layer.bias))
    return (type(layer).__name__, id(layer.weight), id(layer.bias), layer.stride, layer.padding, layer.dilation, layer.groups)


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
                return False
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
