"""Checks on an uploaded torch.export archive, made before torch reads a byte of it.

`torch.export.load` is NOT safe on untrusted files (its own docstring says so). Verified in
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
import io
import json
import keyword
import math
import operator
import re
import warnings
import zipfile
from typing import Any

import torch

from .errors import InvalidArchiveError


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
