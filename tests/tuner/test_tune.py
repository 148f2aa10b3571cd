"""The search, end to end on the bundled digits model (naive INT8 breaks the budget there)."""

import math

import optuna
import pytest
import torch

from tuner import EvaluationError, InvalidArgumentError, Plan, tune
from tuner.examples import digits


class Counting:
    """The user's evaluate, counting calls and the plans it saw."""

    def __init__(self, fn=digits.evaluate, fail_on=None):
        self.fn, self.calls, self.fail_on = fn, 0, fail_on

    def __call__(self, model):
        self.calls += 1
        if self.fail_on is not None and self.fail_on(self.calls):
            raise RuntimeError(f"boom on call {self.calls}")
        return self.fn(model)


def test_meets_the_budget_fully_int8_in_two_evaluations(digits_model, digits_batches):
    evaluate = Counting()
    result = tune(digits_model, digits_batches, evaluate, max_drop=0.01, verify=False, verbose=False)
    assert result.met and result.fp32_layers == []
    assert result.drop <= 0.01
    assert result.evaluations == evaluate.calls == 2  # baseline + one plan
    assert result.coverage["macs"] == 1.0
    assert Plan.from_json(result.plan.to_json()) == result.plan
    assert digits.evaluate(result.model) == pytest.approx(result.score)
    assert set(result.ledger) == {"conv1", "conv2", "fc1", "fc2"}
    assert "met the budget" in result.ledger["fc1"]["reason"]


def test_restricted_space_forces_fallback_and_the_ledger_explains_it(digits_model, digits_batches):
    evaluate = Counting()
    space = {"activation": ["max"], "weights": ["per_tensor"], "scheme": ["affine"], "smooth": False}
    result = tune(digits_model, digits_batches, evaluate, space=space, verify=False, verbose=False, max_trials=12)
    assert result.met and 0 < len(result.fp32_layers) < 4
    assert result.fp32_layers == ["fc1", "fc2"]  # the outlier row's weights and the outlier input
    assert result.plan.config("conv2").int8  # the convolutions, 97% of the MACs, stay INT8
    reason = result.ledger["fc1"]["reason"]
    assert reason.startswith("FP32") and "missed the budget" in reason and "met it" in reason
    assert all(c.weights == "per_tensor" for c in result.plan.layers.values() if c.int8)
    # no plan was evaluated twice
    keys = [t["summary"] for t in result.trials if t["state"] == "COMPLETE" and t["duplicate_of"] is None]
    assert evaluate.calls == 1 + len(keys)


def test_lower_is_better_and_absolute_budget(digits_model, digits_batches):
    def error_rate(model):
        return 100.0 - digits.evaluate(model)

    result = tune(digits_model, digits_batches, error_rate, max_drop=0.5, relative=False, higher_is_better=False,
                  verify=False, verbose=False)
    assert result.met and result.drop <= 0.5
    assert result.drop == pytest.approx(result.score - result.baseline)


def test_failing_trials_are_recorded_and_the_search_goes_on(digits_model, digits_batches):
    evaluate = Counting(fail_on=lambda n: n == 2)  # baseline ok, first plan raises
    result = tune(digits_model, digits_batches, evaluate, verify=False, verbose=False, max_trials=6,
                  evaluate_on="simulation")  # on ONNX Runtime a failed call is retried in simulation
    failed = [t for t in result.trials if t["state"] == "FAIL"]
    assert failed and "boom on call 2" in failed[0]["error"]
    assert result.met and result.score is not None

    nan_eval = Counting(fn=lambda m: float("nan") if nan_eval.calls > 1 else 1.0)
    result = tune(digits_model, digits_batches, nan_eval, verify=False, verbose=False, max_trials=3)
    assert not result.met and result.score is None and "not a finite number" in result.reason
    assert result.plan.int8_layers == []  # nothing could be shown to work: the safe plan


def test_failing_baseline_is_a_clear_error_before_any_search(digits_model, digits_batches):
    def broken(model):
        raise KeyError("labels")

    with pytest.raises(EvaluationError, match="FP32 baseline failed: KeyError"):
        tune(digits_model, digits_batches, broken, verbose=False)
    with pytest.raises(EvaluationError, match="not a finite number"):
        tune(digits_model, digits_batches, lambda m: math.inf, verbose=False)


@pytest.mark.parametrize("kwargs, match", [
    ({"max_drop": -0.1}, "0 <= max_drop < 1"), ({"max_drop": 1.5}, "0 <= max_drop < 1"),
    ({"max_trials": 0}, "max_trials >= 1"), ({"space": {"activation": ["median"]}}, "space `activation`"),
    ({"space": {"layers": []}}, "unknown keys"), ({"space": {"exclude": ["nope"]}}, "exclude"),
    ({"latency_runs": -1}, "latency_runs >= 0"),
])
def test_bad_arguments_are_rejected_with_the_rule(digits_model, digits_batches, kwargs, match):
    with pytest.raises(InvalidArgumentError, match=match):
        tune(digits_model, digits_batches, digits.evaluate, verbose=False, verify=False, **kwargs)


def test_unmeetable_budget_returns_the_best_plan_with_met_false(digits_model, digits_batches):
    scores = iter([10.0] + [5.0 + 0.1 * i for i in range(50)])  # every INT8 plan loses half
    result = tune(digits_model, digits_batches, lambda m: next(scores), max_trials=5, verify=False, verbose=False)
    assert not result.met and result.score is not None
    assert result.plan.int8_layers  # the closest plan, not an empty answer
    assert "no evaluated plan met the budget" in result.reason


def test_resume_with_the_same_storage_re_evaluates_nothing(tmp_path, digits_model, digits_batches):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    space = {"activation": ["max"], "weights": ["per_tensor"], "scheme": ["affine"], "smooth": False}
    first = Counting()
    r1 = tune(digits_model, digits_batches, first, storage=storage, study_name="s", space=space, max_trials=2,
              verify=False, verbose=False)
    assert first.calls == 3  # baseline + 2 trials, then max_trials stops it
    second = Counting()
    r2 = tune(digits_model, digits_batches, second, storage=storage, study_name="s", space=space, max_trials=12,
              verify=False, verbose=False)
    assert r2.met and r2.baseline == r1.baseline
    stored = optuna.load_study(study_name="s", storage=storage)
    evaluated = [t for t in stored.trials if t.state.name == "COMPLETE" and "duplicate_of" not in t.user_attrs]
    assert second.calls == len(evaluated) - 2  # no baseline again, nothing evaluated twice
    assert len({t.user_attrs["plan_key"] for t in evaluated}) == len(evaluated)


def test_stop_request_and_progress_callback(digits_model, digits_batches):
    seen = []
    result = tune(digits_model, digits_batches, digits.evaluate, verify=False, verbose=False,
                  should_stop=lambda: len(seen) >= 1, on_trial=seen.append,
                  space={"activation": ["max"], "weights": ["per_tensor"], "smooth": False})
    assert result.stopped and len(seen) == 1
    assert set(seen[0]) >= {"number", "state", "score", "drop", "coverage", "best_score", "met"}


def test_verbose_prints_one_line_per_trial(digits_model, digits_batches, capsys):
    tune(digits_model, digits_batches, digits.evaluate, verify=False)
    lines = [l for l in capsys.readouterr().out.splitlines() if "trial" in l and "score" in l]
    assert len(lines) == 1 and "drop" in lines[0]


def test_a_trial_interrupted_by_a_dead_worker_is_tried_again(tmp_path, digits_model, digits_batches):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    tune(digits_model, digits_batches, digits.evaluate, storage=storage, study_name="s", max_trials=1,
         verify=False, verbose=False)
    study = optuna.load_study(study_name="s", storage=storage)
    # what a worker killed mid-trial leaves behind once its heartbeat goes stale: a FAIL without error
    first = study.trials[0]
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL, params=first.params,
                                              distributions=first.distributions,
                                              user_attrs={"plan_key": "interrupted-plan"}))
    evaluate = Counting()
    result = tune(digits_model, digits_batches, evaluate, storage=storage, study_name="s", verify=False, verbose=False)
    assert result.met and evaluate.calls == 0  # trial 0 already met; nothing re-run
    from tuner.study import Budget, stored_outcomes
    known = stored_outcomes(study, Budget(0.01, True, True))
    assert "interrupted-plan" not in known  # so a plan it held would be evaluated again


def test_a_point_another_worker_just_claimed_counts_as_pending_until_its_claim_grace_ends(
        digits_model, digits_batches, monkeypatch):
    """Another worker claimed the full-INT8 point but has no RUNNING trial yet: this worker does not
    wait, it takes the next point at once (1 layer FP32); the claimed point is evaluated here only
    once its grace period is over (its claimant may have died before starting it)."""
    from tuner import tuning
    from tuner.prepared import MemoryStore

    class OtherWorkerClaimedFirstPoint(MemoryStore):
        def __init__(self):
            super().__init__()
            self.refused: list[str] = []

        def claim(self, name):
            if name.startswith("point-") and not self.refused:
                self.refused.append(name)
                return False
            return super().claim(name)

    monkeypatch.setattr(tuning, "TAKEN_GRACE_S", 1.0)
    store = OtherWorkerClaimedFirstPoint()
    naive = {"activation": ["max"], "weights": ["per_tensor"], "scheme": ["affine"], "smooth": False}
    result = tune(digits_model, digits_batches, digits.evaluate, space=naive, shared=store, verify=False,
                  verbose=False, max_trials=12)
    evaluated = [t for t in result.trials if t["state"] == "COMPLETE" and t["duplicate_of"] is None]
    full_int8 = [t["number"] for t in evaluated if t["summary"].startswith("4/4")]
    assert evaluated[0]["summary"].startswith("3/4")  # the next point, at once
    assert full_int8 and full_int8[0] > evaluated[0]["number"]  # the claimed point: after its grace
    assert len(store.refused) == 1 and store.claim(store.refused[0])  # refused once, then free


def test_tune_a_model_with_an_embedding_keeps_it_int8(tiny_encoder, encoder_batches):
    """The embedding is a weight-only layer of the plan; the ledger explains it without talking
    about input calibration; the deployed ONNX model scores like the simulated one."""
    test = encoder_batches[0]
    with torch.no_grad():
        reference = tiny_encoder(**test)[0]

    def agreement(model):  # cosine similarity x 100 of the pooled output with the FP32 model's
        with torch.no_grad():
            out = model(**test)[0]
        return 100 * torch.nn.functional.cosine_similarity(out, reference, dim=-1).mean().item()

    result = tune(tiny_encoder, encoder_batches, agreement, max_drop=0.01, verbose=False)
    assert result.met and result.fp32_layers == []
    assert "embed" in result.int8_layers and len(result.plan.layers) == 7
    assert result.plan.layers["embed"].weights == "per_channel" and not result.plan.layers["embed"].smooth
    assert result.evaluations == 2, result.warnings  # the baseline, one plan scored on ONNX Runtime
    assert result.deployed_score == result.score
    assert agreement(result.model) == pytest.approx(result.score, abs=0.05)  # the simulation agrees with the runtime
    entry = result.ledger["embed"]
    assert entry["decision"] == "int8 weight-only/per_channel" and entry["weight_only"]
    assert set(entry["sqnr_db"]) == {"weight-only/per_channel", "weight-only/per_tensor"}
    assert "weight-only per_channel" in entry["reason"] and "met the budget" in entry["reason"]
    assert "max/affine" not in entry["reason"] and "affine" not in entry["reason"]
    assert result.coverage["params"] > 0.9


def test_trials_in_rdb_storage_record_heartbeats(tmp_path, digits_model, digits_batches):
    """Another worker tells a slow trial from a dead one by its heartbeat row."""
    import sqlite3

    db = tmp_path / "study.db"
    seen = []

    def evaluate(model):
        with sqlite3.connect(db) as con:  # the running trial's heartbeat, read while it runs
            seen.extend(con.execute("SELECT trial_id FROM trial_heartbeats").fetchall())
        return digits.evaluate(model)

    tune(digits_model, digits_batches, evaluate, storage=f"sqlite:///{db}", study_name="hb", verify=False,
         verbose=False)
    assert seen  # recorded before evaluate ran (the baseline call sees none: it is no trial)
