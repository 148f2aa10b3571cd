"""`JobSpec`: a job's spec as the worker reads it back. The API stores the validated `JobCreate`
as JSON; here it becomes typed once: the job's `tuner.TuneOptions` and where its inputs come from."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tuner.options import TuneOptions


@dataclass(frozen=True)
class JobSpec:
    options: TuneOptions
    model: str | None = None  # factory reference, else the `model_file` upload
    calibration: str | None = None  # reference, else the `calibration_file` upload
    evaluate: str | None = None  # reference, else the built-in `evaluator`
    evaluator: str | None = None  # 'top1' | 'agreement'
    batch_size: int = 32  # how uploaded tensors are split into batches
    trial_timeout: float | None = None  # seconds one evaluation may take (None: the server's default)

    @classmethod
    def from_stored(cls, spec: Mapping[str, Any]) -> JobSpec:
        """From the stored JSON. A job has no trial limit unless it sets one (the search ends by itself)."""
        return cls(options=TuneOptions.from_dict({"max_trials": None, **spec}),
                   model=spec.get("model"), calibration=spec.get("calibration"), evaluate=spec.get("evaluate"),
                   evaluator=spec.get("evaluator"), batch_size=int(spec.get("batch_size") or cls.batch_size),
                   trial_timeout=spec.get("trial_timeout"))
