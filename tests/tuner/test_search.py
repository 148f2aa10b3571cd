"""The structured search with several workers: points other workers are evaluating are pending,
and a worker takes the most useful point that is neither known nor pending."""

import json

from tuner.search import SAMPLE, WAIT, Strategy
from tuner.space import SearchSpace
from tuner.study import Outcome

NAIVE = SearchSpace.from_dict({"activation": ["max"], "weights": ["per_tensor"], "scheme": ["affine"], "smooth": False})


def key(point):
    return json.dumps(point, sort_keys=True)


def at(k):
    return key(NAIVE.point(k))


def outcomes(met_from, *counts):
    """Outcomes of the given fallback counts: a count meets the budget when >= met_from."""
    return {at(k): Outcome(i, "COMPLETE", at(k), 1.0, 0.0 if k >= met_from else 0.5, 1 - k / 100, k >= met_from,
                           None, 1.0, 0.0) for i, k in enumerate(counts)}


def fallback(point):
    return point["fallback"] if isinstance(point, dict) else point


def test_one_worker_doubles_then_bisects_then_samples():
    strategy = Strategy(NAIVE, 16, key)
    assert fallback(strategy.next_point({})) == 0
    assert fallback(strategy.next_point(outcomes(6, 0))) == 1
    assert fallback(strategy.next_point(outcomes(6, 0, 1, 2, 4))) == 8
    assert fallback(strategy.next_point(outcomes(6, 0, 1, 2, 4, 8))) == 6  # bisect (4, 8)
    assert fallback(strategy.next_point(outcomes(6, 0, 1, 2, 4, 8, 6))) == 5
    # 6 is the fewest; with one INT8 setting a plan is its fallback count: nothing left to sample
    assert strategy.next_point(outcomes(6, 0, 1, 2, 4, 8, 6, 5)) is None


def test_with_several_settings_alternatives_then_the_sampler_follow_the_bisection():
    space = SearchSpace.from_dict({**NAIVE.to_dict(), "activation": ["max", "mse"]})
    strategy = Strategy(space, 4, key)
    known = {key(space.point(k)): o for k, o in zip((0, 1), outcomes(1, 0, 1).values())}
    alternative = strategy.next_point(known)
    assert alternative == space.point(0, activation="mse", smooth=False)
    known[key(alternative)] = Outcome(9, "COMPLETE", key(alternative), 1.0, 0.5, 1.0, False, None, 1.0, 0.0)
    assert strategy.next_point(known) == SAMPLE


def test_spare_workers_take_the_counts_that_would_follow_a_miss():
    strategy = Strategy(NAIVE, 4, key)
    assert fallback(strategy.next_point({}, {at(0)})) == 1
    assert fallback(strategy.next_point({}, {at(0), at(1)})) == 2
    assert fallback(strategy.next_point({}, {at(0), at(1), at(2)})) == 3
    assert strategy.next_point({}, {at(0), at(1), at(2), at(3)}) == WAIT
    assert strategy.next_point(outcomes(2, 0), {at(1), at(2), at(3)}) == WAIT


def test_spare_workers_bisect_both_sides_of_a_pending_midpoint():
    strategy = Strategy(NAIVE, 16, key)
    known = outcomes(6, 0, 1, 2, 4, 8)  # the answer lies in (4, 8]
    assert fallback(strategy.next_point(known, {at(6)})) == 5  # the lower side first: more INT8 if it meets
    assert fallback(strategy.next_point(known, {at(6), at(5)})) == 7
    assert strategy.next_point(known, {at(6), at(5), at(7)}) == WAIT


def test_a_met_full_int8_plan_ends_the_search_whatever_is_running():
    strategy = Strategy(NAIVE, 4, key)
    assert strategy.next_point(outcomes(0, 0), {at(1), at(2)}) is None


def test_no_sampling_while_a_pending_point_could_still_improve_the_best():
    strategy = Strategy(NAIVE, 16, key)
    known = outcomes(1, 0, 2)  # 2 met, 1 pending: it may meet with fewer layers in FP32
    assert strategy.next_point(known, {at(1)}) == WAIT
    assert strategy.next_point(outcomes(1, 0, 2, 1)) is None


def test_a_met_plan_as_int8_as_the_full_one_ends_the_search():
    """An alternative setting that meets the budget with no layer FP32: nothing can beat it, so
    the other alternatives and the sampler are not tried (issue 16: 5 evaluations saved on MiniLM)."""
    space = SearchSpace.from_dict({**NAIVE.to_dict(), "activation": ["max", "mse", "entropy"]})
    strategy = Strategy(space, 4, key)
    known = {key(space.point(k)): o for k, o in zip((0, 1), outcomes(1, 0, 1).values())}
    alternative = strategy.next_point(known)
    assert alternative == space.point(0, activation="mse", smooth=False)
    known[key(alternative)] = Outcome(9, "COMPLETE", key(alternative), 1.0, 0.0, 1.0, True, None, 1.0, 0.0)
    assert strategy.next_point(known) is None


def test_a_setting_that_met_with_slack_is_tried_with_fewer_fp32_layers():
    """Issue 16: the fallback met with 3 FP32 layers and an alternative setting met at 2 with much
    of the budget left: that setting is tried with none in FP32, then bisected, before sampling."""
    space = SearchSpace.from_dict({**NAIVE.to_dict(), "activation": ["max", "mse"]})
    strategy = Strategy(space, 8, key, slack=0.005)

    def outcome(point, number, drop, met):
        return {key(point): Outcome(number, "COMPLETE", key(point), 1.0, drop, 1 - point["fallback"] / 8, met,
                                    None, 1.0, 0.0)}

    known = {}
    for number, k in enumerate((0, 1, 2, 4, 3)):  # the measured best meets from 3 FP32 layers on
        known |= outcome(space.point(k), number, 0.002 if k >= 3 else 0.02, k >= 3)
    assert strategy.next_point(known) == space.point(2, activation="mse", smooth=False)  # one fewer
    known |= outcome(space.point(2, activation="mse", smooth=False), 5, -0.01, True)  # met, lots of slack
    assert strategy.next_point(known) == space.point(0, activation="mse", smooth=False)  # none in FP32 first
    known |= outcome(space.point(0, activation="mse", smooth=False), 6, 0.02, False)
    assert strategy.next_point(known) == space.point(1, activation="mse", smooth=False)  # then bisection
    known |= outcome(space.point(1, activation="mse", smooth=False), 7, 0.004, True)
    assert strategy.next_point(known) == SAMPLE  # 1 FP32 layer is the fewest for mse


def test_a_setting_that_met_without_slack_is_not_retried():
    space = SearchSpace.from_dict({**NAIVE.to_dict(), "activation": ["max", "mse"]})
    strategy = Strategy(space, 8, key, slack=0.005)
    known = {}
    runs = [(0, {}, 0.02), (1, {}, 0.02), (2, {}, 0.009), (1, {"activation": "mse", "smooth": False}, 0.009)]
    for number, (k, overrides, drop) in enumerate(runs):
        point = space.point(k, **overrides)
        known[key(point)] = Outcome(number, "COMPLETE", key(point), 1.0, drop, 1 - k / 8, drop <= 0.01, None, 1.0, 0.0)
    assert strategy.next_point(known) == SAMPLE  # mse met at 1 with little room: not tried at 0


def test_the_plain_plan_comes_first_and_the_smoothed_one_before_any_fallback():
    space = SearchSpace.from_dict({"activation": ["max", "mse"], "weights": ["per_tensor"], "scheme": ["affine"],
                                   "smooth": True})
    strategy = Strategy(space, 4, key, near_miss=0.02)
    plain, smoothed = space.point(0, smooth=False), space.point(0)
    assert strategy.next_point({}) == plain  # no SmoothQuant Div in the first plan

    def tried(point, number, drop):
        return {key(point): Outcome(number, "COMPLETE", key(point), 1.0, drop, 1 - point["fallback"] / 8, drop <= 0.01,
                                    None, 1.0, 0.0)}

    assert strategy.next_point(tried(plain, 0, 0.015)) == smoothed  # a near miss
    assert strategy.next_point(tried(plain, 0, 0.05)) == smoothed  # and a far one: outliers are what it fixes
    assert strategy.next_point(tried(plain, 0, 0.005)) is None  # met with every layer INT8: nothing beats it
    known = tried(plain, 0, 0.015) | tried(smoothed, 1, -0.001)
    assert strategy.next_point(known) is None
    mse = space.point(0, activation="mse", smooth=False)
    known = tried(plain, 0, 0.015) | tried(smoothed, 1, 0.03)
    assert strategy.next_point(known) == mse  # the plain plan missed by little: one more method, still full INT8
    known |= tried(mse, 2, 0.012)
    assert fallback(strategy.next_point(known)) == 1  # it missed too: layers fall back (smoothed) as before
    far = tried(plain, 0, 0.05) | tried(smoothed, 1, 0.03)
    assert fallback(strategy.next_point(far)) == 1  # far misses fall back at once
    assert strategy.next_point(far | tried(space.point(1), 2, 0.0)) == mse
    assert fallback(strategy.next_point({}, {key(plain)})) == 1  # spare workers: unchanged


def test_for_a_model_without_convolutions_the_smoothed_plan_comes_first_and_the_plain_one_second():
    space = SearchSpace.from_dict({"activation": ["max", "mse"], "weights": ["per_tensor"], "scheme": ["affine"],
                                   "smooth": True})
    strategy = Strategy(space, 4, key, near_miss=0.02, smoothed_first=True)
    plain, smoothed = space.point(0, smooth=False), space.point(0)
    assert strategy.next_point({}) == smoothed

    def tried(point, number, drop):
        return {key(point): Outcome(number, "COMPLETE", key(point), 1.0, drop, 1.0, drop <= 0.01, None, 1.0, 0.0)}

    assert strategy.next_point(tried(smoothed, 0, 0.005)) is None  # met with every layer INT8
    assert strategy.next_point(tried(smoothed, 0, 0.05)) == plain  # any miss: the other full-INT8 plan
    mse = space.point(0, activation="mse", smooth=False)
    assert strategy.next_point(tried(smoothed, 0, 0.015) | tried(plain, 1, 0.03)) == mse  # then the third
    assert fallback(strategy.next_point(tried(smoothed, 0, 0.05) | tried(plain, 1, 0.03))) == 1
    no_smoothing = SearchSpace.from_dict({"smooth": False})
    assert Strategy(no_smoothing, 4, key, smoothed_first=True).next_point({}) == no_smoothing.point(0)


def test_without_smoothing_a_near_miss_tries_another_method_before_any_fallback():
    space = SearchSpace.from_dict({"activation": ["max", "mse"], "weights": ["per_tensor"], "scheme": ["affine"],
                                   "smooth": False})
    strategy = Strategy(space, 4, key, near_miss=0.02)
    first = space.point(0)

    def missed(drop):
        return {key(first): Outcome(0, "COMPLETE", key(first), 1.0, drop, 1.0, False, None, 1.0, 0.0)}

    assert strategy.next_point(missed(0.015)) == space.point(0, activation="mse", smooth=False)
    assert fallback(strategy.next_point(missed(0.05))) == 1  # a far miss falls back at once

def test_the_third_full_int8_plan_is_the_method_with_the_best_measured_output_error():
    space = SearchSpace.from_dict({"activation": ["max", "mse", "percentile-99.999", "entropy"],
                                   "weights": ["per_tensor"], "scheme": ["affine"], "smooth": True})
    measured = {"mse": 9.8, "percentile-99.999": 16.9, "entropy": -1.8}  # WordSim's full-INT8 plans, dB
    strategy = Strategy(space, 4, key, near_miss=0.02, quality=lambda p: measured[p["activation"]])
    plain, smoothed = space.point(0, smooth=False), space.point(0)
    known = {}
    for number, (point, drop) in enumerate([(plain, 0.015), (smoothed, 0.03)]):
        known[key(point)] = Outcome(number, "COMPLETE", key(point), 1.0, drop, 1.0, False, None, 1.0, 0.0)
    assert strategy.next_point(known) == space.point(0, activation="percentile-99.999", smooth=False)
    unmeasured = Strategy(space, 4, key, near_miss=0.02)
    assert unmeasured.next_point(known) == space.point(0, activation="mse", smooth=False)  # the listed order
