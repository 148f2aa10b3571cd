"""`TuneOptions`: the options of one tuning run, in one frozen value object (torchao's config
style): its defaults, its rules (checked when it is built), and a JSON round trip.

    from tuner import TuneOptions, tune
    options = TuneOptions(max_drop=0.02, max_trials=30)
    result = tune(model, calibration, evaluate, options=options)   # or tune(..., max_drop=0.02, ...)

The service builds one from a job's spec (`JOB_FIELDS`: what a job may set; the rest are the
library's own); the SDK and the CLI send those same fields. Importing this module imports neither
torch nor the rest of the tuner.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import InvalidArgumentError

ONNXRUNTIME, SIMULATION = "onnxruntime", "simulation"
EVALUATE_ON = (ONNXRUNTIME, SIMULATION)  # what a plan's score is measured on (`tuner.runtime_trials`)
# The options a service job sets (its spec's fields of the same names).
JOB_FIELDS: tuple[str, ...] = ("max_drop", "relative", "higher_is_better", "max_trials", "timeout", "seed", "space",
                               "evaluate_on")


@dataclass(frozen=True)
class TuneOptions:
    """What `tune` searches for and how long.

    - `max_drop`: the accuracy budget, relative to the FP32 baseline (`0 <= max_drop < 1`) unless
      `relative=False` (then absolute, `max_drop >= 0`); `higher_is_better=False` for losses.
    - `max_trials` (None: no limit) and `timeout` (seconds of search, None: none) bound the search.
    - `seed`: the sampler's seed. `space`: a search-space restriction (a `SearchSpace` or its
      dict form, see `tuner.space`), kept as given and turned into a `SearchSpace` by `tune`.
    - `evaluate_on`: what each plan's score is measured on: "onnxruntime" (default) exports the
      plan to ONNX and runs `evaluate` on ONNX Runtime, the model users deploy (`tuner.runtime_trials`);
      "simulation" runs it on the PyTorch simulation of the plan (no export per plan).
    - `verify`: check the chosen plan's ONNX model: its kernels and speed on ONNX Runtime
      (`latency_runs` timed calls per figure, 0: no timing), and its score there (one more
      evaluation, unless the search already evaluated that file); a gap above `verify_tolerance`
      (share of the baseline) between simulated and deployed score is warned about.
    - `verbose`: print one line per step.
    """

    max_drop: float = 0.01
    relative: bool = True
    higher_is_better: bool = True
    max_trials: int | None = 50
    timeout: float | None = None
    seed: int = 0
    space: Any = None
    evaluate_on: str = ONNXRUNTIME
    verify: bool = True
    verify_tolerance: float = 0.002
    latency_runs: int = 10
    verbose: bool = True

    def __post_init__(self) -> None:
        max_drop, relative = self.max_drop, self.relative
        if (not isinstance(max_drop, (int, float)) or not math.isfinite(max_drop) or max_drop < 0
                or (relative and max_drop >= 1)):
            rule = "0 <= max_drop < 1" if relative else "0 <= max_drop"
            raise InvalidArgumentError(f"`{rule}` must hold, but got {max_drop=}.")
        if self.evaluate_on not in EVALUATE_ON:
            raise InvalidArgumentError(f"`evaluate_on` must be one of {list(EVALUATE_ON)}, but got {self.evaluate_on!r}.")
        max_trials, timeout, latency_runs = self.max_trials, self.timeout, self.latency_runs
        if max_trials is not None and (not isinstance(max_trials, int) or max_trials < 1):
            raise InvalidArgumentError(f"`max_trials >= 1` must hold, but got {max_trials=}.")
        if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0):
            raise InvalidArgumentError(f"`timeout > 0` (seconds) must hold, but got {timeout=}.")
        if not isinstance(latency_runs, int) or isinstance(latency_runs, bool) or latency_runs < 0:
            raise InvalidArgumentError(f"`latency_runs >= 0` must hold, but got {latency_runs=}.")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TuneOptions:
        """The options named in `values` (other keys, e.g. the rest of a job's spec, are ignored);
        the defaults for the others."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in names})

    def to_dict(self, fields: tuple[str, ...] | None = None) -> dict[str, Any]:
        """JSON-serialisable (a `SearchSpace` as its dict); only `fields` when given."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if fields is None or f.name in fields}
        if values.get("space") is not None and hasattr(values["space"], "to_dict"):
            values["space"] = values["space"].to_dict()
        return values

    def replace(self, **changes: Any) -> TuneOptions:
        return dataclasses.replace(self, **changes)

    def job_fields(self) -> dict[str, Any]:
        """The options a service job carries (`JOB_FIELDS`), as JSON."""
        return self.to_dict(JOB_FIELDS)

    def budget(self) -> dict[str, Any]:
        return {"max_drop": float(self.max_drop), "relative": self.relative, "higher_is_better": self.higher_is_better}
