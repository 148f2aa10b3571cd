"""Built-in evaluators, for users whose evaluation code is not on the workers. Both return a
percentage (higher is better)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from tuner.batches import call_model, output_tensors


def _logits(model: Any, batch: Any) -> torch.Tensor:
    output = call_model(model, batch)
    if not isinstance(output, torch.Tensor):
        found = output_tensors(output)
        if found:
            output = found[0]
        else:  # e.g. numpy arrays from a runtime wrapper
            first = output[0] if isinstance(output, (tuple, list)) else output
            output = torch.as_tensor(first)
    return output


@torch.no_grad()
def _top1(model: Any, batches: Sequence[Any]) -> list[torch.Tensor]:
    return [_logits(model, batch).argmax(-1).reshape(-1) for batch in batches]


def top1(batches: Sequence[Any], labels: Sequence[torch.Tensor]) -> Callable[[Any], float]:
    """Accuracy (%) of argmax(output, -1) against the uploaded labels."""
    total = sum(int(label.numel()) for label in labels)

    def evaluate(model: Any) -> float:
        predicted = _top1(model, batches)
        correct = sum(int((p == y.reshape(-1)).sum()) for p, y in zip(predicted, labels, strict=True))
        return 100.0 * correct / total

    return evaluate


def agreement(reference_model: Any, batches: Sequence[Any]) -> Callable[[Any], float]:
    """Share (%) of samples whose top-1 matches the FP32 model's (computed once, lazily)."""
    reference: list[torch.Tensor] = []

    def evaluate(model: Any) -> float:
        if not reference:
            reference.extend(_top1(reference_model, batches))
        predicted = _top1(model, batches)
        same = sum(int((p == r).sum()) for p, r in zip(predicted, reference, strict=True))
        return 100.0 * same / sum(int(r.numel()) for r in reference)

    return evaluate
