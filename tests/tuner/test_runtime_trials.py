"""Plans scored on ONNX Runtime (`evaluate_on`, `tuner.runtime_trials`): the search evaluates the
file users deploy, and the deployed check reuses it instead of evaluating again."""

import hashlib

import pytest

from tuner import InvalidArgumentError, Plan, calibrate, tune
from tuner.examples import digits
from tuner.onnx_runtime import OnnxModule
from tuner.runtime_trials import RuntimeTrials


class Recording:
    """The user's evaluate, recording what it was called on (and the ONNX file's hash)."""

    def __init__(self):
        self.seen = []

    def __call__(self, model):
        if isinstance(model, OnnxModule):
            self.seen.append(("onnxruntime", hashlib.sha256(model.path.read_bytes()).hexdigest()))
        else:
            self.seen.append(("torch", None))
        return digits.evaluate(model)


def test_plans_are_scored_on_onnx_runtime_and_the_deployed_check_reuses_the_file(digits_model, digits_batches):
    evaluate = Recording()
    result = tune(digits_model, digits_batches, evaluate, max_drop=0.01, verbose=False, latency_runs=0)
    assert result.met and result.fp32_layers == []
    assert [kind for kind, _ in evaluate.seen] == ["torch", "onnxruntime"]  # the FP32 baseline, then the plan
    assert result.evaluations == 2  # no evaluation of its own in the deployed check
    assert result.deployed_score == result.score and result.deployed_drop == result.drop
    assert hashlib.sha256(result.onnx).hexdigest() == evaluate.seen[1][1]  # model.onnx is the file that was scored
    assert result.deployment.kernels.running_int8 == result.int8_layers


def test_in_simulation_the_deployed_check_evaluates_once_more(digits_model, digits_batches):
    evaluate = Recording()
    result = tune(digits_model, digits_batches, evaluate, max_drop=0.01, verbose=False, latency_runs=0,
                  evaluate_on="simulation")
    assert [kind for kind, _ in evaluate.seen] == ["torch", "torch", "onnxruntime"]
    assert result.evaluations == 3 and result.deployed_score == pytest.approx(result.score, abs=0.5)


def test_an_evaluation_that_cannot_run_onnx_runtime_falls_back_to_the_simulation(digits_model, digits_batches):
    calls = []

    def weights_only(model):
        calls.append(type(model).__name__)
        if isinstance(model, OnnxModule):
            raise TypeError("needs the PyTorch weights")
        return digits.evaluate(model)

    with pytest.warns(UserWarning, match="could not measure the score on ONNX Runtime"):
        result = tune(digits_model, digits_batches, weights_only, max_drop=0.01, verbose=False, latency_runs=0,
                      space={"activation": ["max"], "weights": ["per_tensor"], "scheme": ["affine"], "smooth": False})
    assert result.met and result.deployed_score is None
    assert calls.count("OnnxModule") == 1  # tried once on ONNX Runtime: every later plan is simulated directly
    assert result.evaluations == len(calls)  # the repeated call is counted too
    assert result.deployment.errors["score"].startswith("the evaluation raised TypeError when run on the ONNX Runtime")
    assert result.deployment.kernels is not None  # the rest of the check still ran


def test_only_the_best_plans_file_is_kept(digits_model, digits_batches):
    calib = calibrate(digits_model, digits_batches)
    runtime = RuntimeTrials(digits_model, calib, lambda line: None)
    plans = [Plan.uniform(calib.layers), Plan.uniform(calib.layers).fallback(["fc2"])]
    modules = [runtime.build(plan) for plan in plans]
    assert all(isinstance(m, OnnxModule) for m in modules) and runtime.reason is None
    paths = [runtime.files[p.key()] for p in plans]
    assert all(path.exists() for path in paths)
    runtime.keep({plans[1].key()})
    assert not paths[0].exists() and paths[1].exists() and list(runtime.files) == [plans[1].key()]
    runtime.close()
    assert not paths[1].exists()


def test_evaluate_on_must_name_a_known_target(digits_model, digits_batches):
    with pytest.raises(InvalidArgumentError, match=r"`evaluate_on` must be one of \['onnxruntime', 'simulation'\]"):
        tune(digits_model, digits_batches, digits.evaluate, evaluate_on="gpu")


def test_a_plan_whose_evaluation_fails_on_both_is_a_failed_trial_and_the_runtime_stays(digits_model, digits_batches):
    calls = []

    def flaky(model):
        calls.append("onnxruntime" if isinstance(model, OnnxModule) else "torch")
        if len(calls) in (2, 3):  # the first plan: on ONNX Runtime, then its simulation
            raise RuntimeError(f"boom on call {len(calls)}")
        return digits.evaluate(model)

    result = tune(digits_model, digits_batches, flaky, max_drop=0.01, verbose=False, latency_runs=0, max_trials=3)
    failed = [t for t in result.trials if t["state"] == "FAIL"]
    assert len(failed) == 1 and "boom on call 3" in failed[0]["error"]  # the simulation's error: the user's
    assert calls[:4] == ["torch", "onnxruntime", "torch", "onnxruntime"]  # the next plan: on ONNX Runtime again
    assert result.met and result.deployed_score == result.score and result.evaluations == len(calls)


def test_once_the_runtime_worked_a_failed_evaluation_is_a_verdict(digits_model, digits_batches):
    calls = []

    def flaky(model):
        calls.append("onnxruntime" if isinstance(model, OnnxModule) else "torch")
        if len(calls) == 3:
            raise RuntimeError("boom on call 3")
        return digits.evaluate(model)

    naive = {"activation": ["max"], "weights": ["per_tensor"], "scheme": ["affine"], "smooth": False}
    result = tune(digits_model, digits_batches, flaky, max_drop=0.01, verbose=False, verify=False, space=naive,
                  max_trials=4)  # naive full INT8 misses: the search needs several plans
    assert calls[:4] == ["torch", "onnxruntime", "onnxruntime", "onnxruntime"]  # call 3 is not repeated
    failed = [t for t in result.trials if t["state"] == "FAIL"]
    assert len(failed) == 1 and "boom on call 3" in failed[0]["error"]
