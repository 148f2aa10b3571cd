"""The search space, declared in tuner/space.py, read through Optuna's FixedTrial."""

import optuna
import pytest

from tuner import InvalidArgumentError, SearchSpace, calibrate, layer_report
from tuner.space import AUTO, plan_for


def test_fixed_trial_points_become_the_expected_plans(digits_model, digits_batches):
    calib = calibrate(digits_model, digits_batches)
    report = layer_report(digits_model, calib)
    space = SearchSpace()
    ranking = ["fc2", "fc1", "conv2", "conv1"]
    params = space.suggest(optuna.trial.FixedTrial({"activation": AUTO, "scheme": AUTO, "weights": AUTO,
                                                    "smooth": True, "fallback": 0}), n_layers=4)
    assert params == space.point(0)
    full = plan_for(params, space, report, ranking)
    assert full.fp32_layers == [] and full == report.best_plan(space.settings())

    fixed = space.suggest(optuna.trial.FixedTrial({"activation": "mse", "scheme": "symmetric",
                                                   "weights": "per_tensor", "smooth": False, "fallback": 2}), 4)
    plan = plan_for(fixed, space, report, ranking)
    assert plan.fp32_layers == ["fc1", "fc2"]  # the two most sensitive of the ranking
    assert {c.setting() for c in plan.layers.values() if c.int8} == {"mse/symmetric/per_tensor"}


def test_the_plain_point_smooths_only_a_layer_whose_unsmoothed_error_is_large(digits_model, digits_batches):
    """fc2 reads the example's outlier channel: unsmoothed it keeps 7.7 dB, smoothed 46.9 dB. The
    plain point (smooth=False) smooths it and nothing else; a space without SmoothQuant never does."""
    from tuner.report import NEEDS_SMOOTHING_DB

    calib = calibrate(digits_model, digits_batches)
    report = layer_report(digits_model, calib)
    space = SearchSpace()
    plain = plan_for(space.point(0, smooth=False), space, report, [])
    unsmoothed = {n: e.best([c for c in e.settings.values() if not c.smooth]) for n, e in report.layers.items()}
    needy = {n for n, c in unsmoothed.items() if report.layers[n].sqnr_of(c) < NEEDS_SMOOTHING_DB}
    assert needy == {"fc2"}
    assert {n for n, c in plain.layers.items() if c.smooth} == {"fc2"}
    assert all(plain.layers[n] == unsmoothed[n] for n in report.layers if n != "fc2")
    no_smoothing = SearchSpace.from_dict({"smooth": False})
    assert not any(c.smooth for c in plan_for(no_smoothing.point(0), no_smoothing, report, []).layers.values())


def test_a_restricted_space_only_suggests_what_it_allows():
    space = SearchSpace.from_dict({"activation": ["max"], "weights": ["per_channel"], "smooth": False,
                                   "fallback": False})
    params = space.suggest(optuna.trial.FixedTrial({"activation": "max", "scheme": "affine",
                                                    "weights": "per_channel"}), n_layers=4)
    assert params["fallback"] == 0 and params["smooth"] is False
    with pytest.raises(ValueError):  # a value outside the restricted choices is not in the space
        space.suggest(optuna.trial.FixedTrial({"activation": "mse", "scheme": "affine", "weights": "per_channel"}), 4)
    assert SearchSpace.from_dict(space.to_dict()) == space
    with pytest.raises(InvalidArgumentError, match="space `weights`"):
        SearchSpace.from_dict({"weights": []})


def test_the_smoothed_point_smooths_every_linear_of_a_model_without_convolutions():
    """Inputs without outliers: each Linear's best setting is unsmoothed, yet the smoothed point
    smooths both Linears of an MLP (strongest strength within the window, no bias correction); a
    convnet's classifier keeps its best-measured setting."""
    from dataclasses import replace

    import torch
    from torch import nn

    from tuner.report import STRONGEST_SMOOTHING_WINDOW_DB

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    report = layer_report(mlp, calibrate(mlp, [torch.randn(64, 16) for _ in range(4)]))
    space = SearchSpace()
    assert not any(c.smooth for c in report.best_plan(space.settings()).layers.values())
    smoothed = plan_for(space.point(0), space, report, [])
    for name, errors in report.layers.items():
        config = smoothed.layers[name]
        alike = {c.smooth: errors.sqnr_of(c) for c in errors.settings.values() if c.smooth and c == replace(config, smooth=c.smooth)}
        assert config.smooth == max(a for a, v in alike.items() if v >= max(alike.values()) - STRONGEST_SMOOTHING_WINDOW_DB)
        assert not config.bias_correction
    assert not any(c.smooth for c in plan_for(space.point(0, smooth=False), space, report, []).layers.values())

    conv = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 8)).eval()
    report = layer_report(conv, calibrate(conv, [torch.randn(8, 1, 8, 8) for _ in range(4)]))
    assert plan_for(space.point(0), space, report, []).layers["3"] == report.layers["3"].best(space.settings())
    assert not report.layers["3"].best(space.settings()).smooth
