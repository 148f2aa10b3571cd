"""The bundled conv-heavy example: its contract (as tuner.examples.digits), deterministic training that
does not depend on the caller's thread setting, BatchNorm already folded, and naive INT8 that breaks
a 1% budget."""

import torch
from torch import nn

from tuner import LayerConfig, apply_plan, calibrate
from tuner.examples import digits_cnn


def test_digits_cnn_contract_and_naive_int8_breaks_the_budget():
    threads = torch.get_num_threads()
    model, again = digits_cnn.build_model(), digits_cnn.build_model()
    assert torch.get_num_threads() == threads  # training ran on one thread and restored the setting
    assert model is not again and not model.training
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    batches = digits_cnn.calibration_data()
    assert [tuple(b.shape) for b in batches] == [(32, 1, 32, 32)] * 4

    baseline = digits_cnn.evaluate(model)
    assert baseline > 95
    calibration = calibrate(model, batches)
    assert set(calibration.layers) == {"conv1", "conv2", "conv3", "conv4", "fc1", "fc2"}
    naive = digits_cnn.evaluate(apply_plan(model, calibration.uniform_plan(LayerConfig(weights="per_tensor")),
                                           calibration))
    assert naive < 0.5 * baseline  # the planted outlier channel: per-tensor INT8 is far off the budget
    assert digits_cnn.evaluate(model) == baseline  # the caller's model is untouched
