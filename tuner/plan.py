"""Plans: which layers run INT8, and how. Plain, frozen, versioned data that round-trips through JSON.

```json
{"version": 1,
 "layers": {"conv1": {"precision": "int8", "activation": "percentile-99.99",
                      "scheme": "affine", "weights": "per_channel"},
            "fc2":   {"precision": "fp32"}},
 "tensors": {"layer1.0": "fp32"}}
```
`tensors` (optional) overrides where tensors beyond layer inputs are quantized for the INT8
runtime (see `Calibration.output_sites`). A layer left out of a plan stays FP32. A FP32 layer keeps its weights and its input in float.
An `nn.Embedding` is a weight-only layer (its input is integer indices): its config uses only
`precision` and `weights`; `activation` and `scheme` do not apply (they are ignored) and `smooth`
is refused when the plan is applied.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import InvalidPlanError
from .histogram import METHODS

PLAN_VERSION = 1
PRECISIONS = ("int8", "fp32")
SCHEMES = ("affine", "symmetric")
GRANULARITIES = ("per_channel", "per_tensor")


@dataclass(frozen=True)
class LayerConfig:
    """How one layer is quantized. `activation` is the calibration method of its input range,
    `scheme` the input's quantization (affine: UINT8 with a zero point; symmetric: INT8, z = 0),
    `weights` the weight granularity (weights are always symmetric INT8), `smooth` the
    SmoothQuant migration strength alpha in [0, 1] (0: off): input channel j is divided by
    s_j = max|x_j|^alpha / max|W[:, j]|^(1 - alpha) and weight column j multiplied by it, which
    moves activation outliers into the weights; smoothed inputs are calibrated by "max".
    `bias_correction`: the expected output shift per output channel that this setting causes,
    measured on the calibration data, is subtracted from the bias (free at run time).
    For a weight-only layer (`nn.Embedding`) only `precision` and `weights` apply."""

    precision: str = "int8"
    activation: str = "max"
    scheme: str = "affine"
    weights: str = "per_channel"
    smooth: float = 0.0
    bias_correction: bool = False

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("precision", self.precision, PRECISIONS),
            ("activation", self.activation, METHODS),
            ("scheme", self.scheme, SCHEMES),
            ("weights", self.weights, GRANULARITIES),
        ):
            if value not in allowed:
                raise InvalidPlanError(f"`{name}` must be one of {list(allowed)}, but got {value!r}.")
        if not isinstance(self.smooth, (int, float)) or not 0.0 <= self.smooth <= 1.0:
            raise InvalidPlanError(f"`0 <= smooth <= 1` must hold, but got smooth={self.smooth!r}.")
        if not isinstance(self.bias_correction, bool):
            raise InvalidPlanError(f"`bias_correction` must be true or false, but got {self.bias_correction!r}.")
        if self.smooth and self.activation != "max":
            raise InvalidPlanError(
                f"a smoothed input (smooth={self.smooth}) is calibrated by 'max' only, but got {self.activation!r}."
            )

    @property
    def int8(self) -> bool:
        return self.precision == "int8"

    @property
    def symmetric(self) -> bool:
        return self.scheme == "symmetric"

    def to_dict(self) -> dict[str, Any]:
        if not self.int8:
            return {"precision": "fp32"}
        data = asdict(self)
        if not self.smooth:
            del data["smooth"]  # keep plans short; absent means 0
        if not self.bias_correction:
            del data["bias_correction"]
        return data

    def setting(self, weight_only: bool = False) -> str:
        """The INT8 setting as one label, e.g. `mse/affine/per_channel` or `max/affine/per_channel/smooth0.5/bc`;
        for a weight-only layer (an embedding) just its weights, e.g. `weight-only/per_channel`."""
        if weight_only:
            return f"weight-only/{self.weights}"
        label = f"{self.activation}/{self.scheme}/{self.weights}"
        label = f"{label}/smooth{self.smooth:g}" if self.smooth else label
        return f"{label}/bc" if self.bias_correction else label

    def short(self, weight_only: bool = False) -> str:
        """A compact label, e.g. `int8 mse/affine/per_channel`, `int8 weight-only/per_channel` or `fp32`."""
        return f"int8 {self.setting(weight_only)}" if self.int8 else "fp32"


FP32 = LayerConfig(precision="fp32")


@dataclass(frozen=True)
class Plan:
    """Per layer (qualified module name), its `LayerConfig`; optionally, per tensor site (the
    module returning the tensor), "int8" or "fp32" to add or remove a quantizer that the INT8
    runtime placement (`Calibration.output_sites`) would otherwise choose."""

    layers: Mapping[str, LayerConfig] = field(default_factory=dict)
    version: int = PLAN_VERSION
    tensors: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.version != PLAN_VERSION:
            raise InvalidPlanError(f"plan `version` must be {PLAN_VERSION}, but got {self.version!r}.")
        for name, config in self.layers.items():
            if not isinstance(name, str) or not name:
                raise InvalidPlanError(f"layer names must be non-empty strings, but got {name!r}.")
            if not isinstance(config, LayerConfig):
                raise InvalidPlanError(f"layer {name!r} must map to a LayerConfig, but got {type(config).__name__}.")
        object.__setattr__(self, "layers", dict(sorted(self.layers.items())))
        if not isinstance(self.tensors, Mapping):
            raise InvalidPlanError(f"plan 'tensors' must be an object, but got {type(self.tensors).__name__}.")
        for site, value in self.tensors.items():
            if not isinstance(site, str) or value not in PRECISIONS:
                raise InvalidPlanError(f"plan tensor {site!r} must be one of {list(PRECISIONS)}, but got {value!r}.")
        object.__setattr__(self, "tensors", dict(sorted(self.tensors.items())))

    # -- construction -----------------------------------------------------------------------

    @classmethod
    def uniform(cls, layers: Iterable[str], config: LayerConfig = LayerConfig()) -> Plan:
        """Every named layer with the same config."""
        return cls({name: config for name in layers})

    def replace(self, changes: Mapping[str, LayerConfig]) -> Plan:
        """A new plan with some layers' configs replaced."""
        return Plan({**self.layers, **changes}, tensors=self.tensors)

    def fallback(self, names: Iterable[str]) -> Plan:
        """A new plan with the named layers in FP32."""
        return self.replace({name: FP32 for name in names})

    # -- reading ----------------------------------------------------------------------------

    @property
    def int8_layers(self) -> list[str]:
        return [n for n, c in self.layers.items() if c.int8]

    @property
    def fp32_layers(self) -> list[str]:
        return [n for n, c in self.layers.items() if not c.int8]

    def config(self, name: str) -> LayerConfig:
        return self.layers.get(name, FP32)

    def summary(self, most: int = 3) -> str:
        """One line: how many layers are INT8 and with which settings, the commonest first with its
        layer count (`4/4 int8: 3 entropy/scale/per_channel, 1 max/affine/per_channel`); past
        `most` settings, how many more and on how many layers."""
        int8 = [c for c in self.layers.values() if c.int8]
        if not int8:
            return f"0/{len(self.layers)} int8"
        settings: dict[str, int] = {}
        for c in int8:
            key = c.setting()
            settings[key] = settings.get(key, 0) + 1
        head = f"{len(int8)}/{len(self.layers)} int8"
        if len(settings) == 1:
            return f"{head} ({next(iter(settings))})"
        ranked = sorted(settings.items(), key=lambda item: -item[1])  # stable: ties keep layer order
        shown = ", ".join(f"{n} {key}" for key, n in ranked[:most])
        rest = ranked[most:]
        more = (f", +{len(rest)} more setting{'s' if len(rest) > 1 else ''} on {sum(n for _, n in rest)} "
                f"layer{'s' if sum(n for _, n in rest) > 1 else ''}") if rest else ""
        return f"{head}: {shown}{more}"

    # -- JSON -------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"version": self.version, "layers": {n: c.to_dict() for n, c in self.layers.items()}}
        if self.tensors:
            data["tensors"] = dict(self.tensors)
        return data

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        if not isinstance(data, Mapping):
            raise InvalidPlanError(f"a plan must be a JSON object, but got {type(data).__name__}.")
        unknown = set(data) - {"version", "layers", "tensors"}
        if unknown:
            raise InvalidPlanError(f"a plan has only 'version', 'layers' and 'tensors', but got {sorted(unknown)}.")
        layers = data.get("layers", {})
        if not isinstance(layers, Mapping):
            raise InvalidPlanError(f"plan 'layers' must be an object, but got {type(layers).__name__}.")
        configs = {}
        for name, raw in layers.items():
            if not isinstance(raw, Mapping):
                raise InvalidPlanError(f"layer {name!r} must be an object, but got {type(raw).__name__}.")
            extra = set(raw) - set(LayerConfig.__dataclass_fields__)
            if extra:
                raise InvalidPlanError(f"layer {name!r} has unknown fields {sorted(extra)}.")
            configs[name] = FP32 if raw.get("precision") == "fp32" else LayerConfig(**raw)
        return cls(configs, version=data.get("version", PLAN_VERSION), tensors=data.get("tensors", {}))

    @classmethod
    def from_json(cls, text: str | bytes) -> Plan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidPlanError(f"a plan must be valid JSON: {exc}") from None
        return cls.from_dict(data)

    def key(self) -> str:
        """A canonical string identifying the plan (same plan, same key)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
