"""The search space, declared in one place.

A point of the space is a handful of Optuna parameters, not one choice per layer:
- `activation`, `scheme`, `weights`: one value for every layer, or "auto": each layer takes its
  own best-measured value from the per-layer error report;
- `smooth`: whether SmoothQuant settings may be chosen wherever they measure better (False: only
  where a layer's best unsmoothed setting leaves a large error, `NEEDS_SMOOTHING_DB`);
- `fallback`: how many layers, the most sensitive first, stay FP32.
`plan_for(params, ...)` turns a point into a `Plan`. Keeping the space this small is what lets a
handful of evaluations cover it: per-layer detail comes from measurement, not from sampling.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna

from .errors import InvalidArgumentError
from .histogram import METHODS
from .plan import FP32, GRANULARITIES, SCHEMES, LayerConfig, Plan
from .report import NEEDS_SMOOTHING_DB, SMOOTH_COST_DB, LayerErrors, LayerReport, all_settings

AUTO = "auto"


def _choices(name: str, values: Any, allowed: Sequence[str]) -> tuple[str, ...]:
    if isinstance(values, str):
        values = [values]
    values = tuple(values)
    bad = [v for v in values if v not in allowed]
    if not values or bad:
        raise InvalidArgumentError(f"space `{name}` must be a non-empty subset of {list(allowed)}, but got {list(values)}.")
    return values


@dataclass(frozen=True)
class SearchSpace:
    """What the search may choose. Restrict it to pin settings (e.g. `weights=["per_tensor"]`),
    forbid FP32 fallback (`fallback=False`) or SmoothQuant (`smooth=False`), or keep some layers
    out of INT8 altogether (`exclude=["head"]`)."""

    activation: tuple[str, ...] = METHODS
    scheme: tuple[str, ...] = SCHEMES
    weights: tuple[str, ...] = GRANULARITIES
    smooth: bool = True
    fallback: bool = True
    exclude: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        object.__setattr__(self, "activation", _choices("activation", self.activation, METHODS))
        object.__setattr__(self, "scheme", _choices("scheme", self.scheme, SCHEMES))
        object.__setattr__(self, "weights", _choices("weights", self.weights, GRANULARITIES))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        for name in ("smooth", "fallback"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidArgumentError(f"space `{name}` must be true or false, but got {getattr(self, name)!r}.")
        if self.smooth and "max" not in self.activation:
            object.__setattr__(self, "smooth", False)  # smoothed inputs are calibrated by max only

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> SearchSpace:
        if data is None:
            return cls()
        if isinstance(data, SearchSpace):
            return data
        if not isinstance(data, Mapping):
            raise InvalidArgumentError(f"`space` must be a mapping, but got {type(data).__name__}.")
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise InvalidArgumentError(
                f"`space` has unknown keys {sorted(unknown)}; allowed: {sorted(cls.__dataclass_fields__)}."
            )
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return {
            "activation": list(self.activation), "scheme": list(self.scheme), "weights": list(self.weights),
            "smooth": self.smooth, "fallback": self.fallback, "exclude": list(self.exclude),
        }

    def settings(self) -> list[LayerConfig]:
        return all_settings(self.activation, self.scheme, self.weights, smooth=self.smooth)

    # -- the Optuna parameters ---------------------------------------------------------------

    def suggest(self, trial: optuna.Trial, n_layers: int) -> dict[str, Any]:
        """Sample (or, for an enqueued/fixed trial, read) one point of the space."""
        params: dict[str, Any] = {
            "activation": trial.suggest_categorical("activation", [AUTO, *self.activation]),
            "scheme": trial.suggest_categorical("scheme", [AUTO, *self.scheme]),
            "weights": trial.suggest_categorical("weights", [AUTO, *self.weights]),
            "smooth": trial.suggest_categorical("smooth", [False, True]) if self.smooth else False,
            "fallback": trial.suggest_int("fallback", 0, n_layers) if self.fallback and n_layers else 0,
        }
        return params

    def point(self, fallback: int = 0, **overrides: Any) -> dict[str, Any]:
        """The parameters of a point we propose ourselves (all "auto" unless overridden)."""
        params = {"activation": AUTO, "scheme": AUTO, "weights": AUTO, "smooth": self.smooth,
                  "fallback": fallback if self.fallback else 0}
        params.update(overrides)
        return params


def plan_for(params: Mapping[str, Any], space: SearchSpace, report: LayerReport, ranking: Sequence[str]) -> Plan:
    """The plan of a point: each INT8 layer gets its best-measured setting among those the point
    allows; the `fallback` first layers of `ranking` (most sensitive first) stay FP32. A point
    without `smooth` still smooths a layer whose best unsmoothed setting stays under
    `NEEDS_SMOOTHING_DB` (when the space offers SmoothQuant): an outlier channel, which only
    smoothing fixes. In a model without convolutions (a transformer), a point with `smooth`
    smooths every Linear whose Div does not cost another layer its INT8 kernel, at the strength
    `LayerErrors.best` gives a Linear, even where its unsmoothed error measures as small (see
    `STRONGEST_SMOOTHING_WINDOW_DB`: on MiniLM the FFN down-projections measured 42-43 dB
    unsmoothed on one-word inputs, and smoothing them still took WordSim-353 from +0.37% to
    -0.54%). A convnet's classifier is smoothed only where it measures better: forced, it cost
    MobileNetV2's smoothed plan the 0.25% budget (6 evaluations instead of 3)."""
    settings = [
        c for c in space.settings()
        if params["activation"] in (AUTO, c.activation)
        and params["scheme"] in (AUTO, c.scheme)
        and params["weights"] in (AUTO, c.weights)
    ]
    allowed = [c for c in settings if params["smooth"] or not c.smooth]
    if not allowed:  # e.g. activation "mse" with smoothing forced: fall back to the unsmoothed setting
        allowed = [c for c in space.settings() if not c.smooth and params["activation"] in (AUTO, c.activation)]
    smoothing = [] if params["smooth"] else [c for c in settings if c.smooth]  # for a layer that needs it

    # a smoothed point of a model without convolutions: every Linear takes one of these
    linear_smoothing = [c for c in allowed if c.smooth] if params["smooth"] and not report.convolutional else []

    def setting(errors: LayerErrors) -> LayerConfig:
        if linear_smoothing and errors.linear and errors.smooth_cost_db < SMOOTH_COST_DB:
            return errors.best(linear_smoothing)
        best = errors.best(allowed)
        if smoothing and not errors.weight_only and errors.sqnr_of(best) < NEEDS_SMOOTHING_DB:
            return errors.best(allowed + smoothing)
        return best

    fp32 = set(space.exclude) | set(ranking[: int(params["fallback"])])
    return Plan({name: FP32 if name in fp32 else setting(errors) for name, errors in report.layers.items()})
