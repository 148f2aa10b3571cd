"""torch.export archives: export_model -> load_exported gives a model the tuner quantizes exactly
like the eager one, and files that are not safe archives are refused before torch reads them."""

from __future__ import annotations

import json
import os
import pickle
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

import tuner
from tuner import InvalidArchiveError, InvalidArgumentError, QuanttuneError, export_model, load_exported
from tuner.examples import digits

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")  # torch's own, on deepcopy


@pytest.fixture(scope="module")
def digits_archive(tmp_path_factory) -> Path:
    return export_model(digits.build_model(), digits.calibration_data()[0], tmp_path_factory.mktemp("pt2") / "digits.pt2")


def _same_outputs(a, b) -> None:
    flat_a, flat_b = tuner.batches.output_tensors(a), tuner.batches.output_tensors(b)
    assert len(flat_a) == len(flat_b) > 0
    for x, y in zip(flat_a, flat_b):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)


# -- round trips -----------------------------------------------------------------------------------


def test_digits_round_trip_quantizes_like_the_eager_model(digits_archive):
    eager, data = digits.build_model(), digits.calibration_data()
    loaded = load_exported(digits_archive)

    assert list(tuner.quantizable_layers(loaded)) == list(tuner.quantizable_layers(eager)) == ["conv1", "conv2", "fc1", "fc2"]
    assert isinstance(loaded.get_submodule("conv1"), nn.Conv2d) and isinstance(loaded.get_submodule("fc1"), nn.Linear)
    torch.testing.assert_close(loaded.get_submodule("fc1").weight, eager.fc1.weight, rtol=0, atol=0)
    with torch.no_grad():
        _same_outputs(loaded(data[1][:7]), eager(data[1][:7]))  # exported with 32, run with 7
    assert digits.evaluate(loaded) == digits.evaluate(eager)

    eager_cal, loaded_cal = tuner.calibrate(eager, data), tuner.calibrate(loaded, data)
    assert list(loaded_cal.layers) == list(eager_cal.layers)
    plan = loaded_cal.uniform_plan()
    int8_loaded, int8_eager = tuner.apply_plan(loaded, plan, loaded_cal), tuner.apply_plan(eager, plan, eager_cal)
    assert isinstance(int8_loaded.get_submodule("fc1"), tuner.QuantizedLayer)
    assert isinstance(loaded.get_submodule("fc1"), nn.Linear)  # the caller's model is untouched
    with torch.no_grad():
        _same_outputs(int8_loaded(data[2]), int8_eager(data[2]))
    assert digits.evaluate(int8_loaded) == digits.evaluate(int8_eager) < digits.evaluate(eager)


class _Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.query, self.key, self.value, self.out = (nn.Linear(d, d) for _ in range(4))
        self.norm = nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, h, mask):
        q, k, v = self.query(h), self.key(h), self.value(h)
        scores = (q @ k.transpose(1, 2) / q.shape[-1] ** 0.5).masked_fill(mask[:, None, :] == 0, -1e4)
        h = self.norm(h + self.out(scores.softmax(-1) @ v))
        return h + self.ffn(h)


class TinyEncoder(nn.Module):
    """Transformer-like: keyword inputs, a Conv1d, a layer called in a loop, a head tied to the
    embedding, a tuple output."""

    def __init__(self, vocab: int = 100, d: int = 32):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.conv = nn.Conv1d(d, d, 3, padding=1)
        self.layers = nn.ModuleList(_Block(d) for _ in range(2))
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, input_ids, attention_mask):
        h = self.embed(input_ids)
        h = h + self.conv(h.transpose(1, 2)).transpose(1, 2)
        for layer in self.layers:
            h = layer(h, attention_mask)
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1), self.head(h)


def _tokens(batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, seq // 2 :] = 0
    return {"input_ids": torch.randint(0, 100, (batch, seq), generator=g), "attention_mask": mask}


def test_transformer_with_keyword_inputs_and_tuple_output(tmp_path):
    torch.manual_seed(0)
    eager = TinyEncoder().eval()
    loaded = load_exported(export_model(eager, _tokens(4, 6, 0), tmp_path / "tiny.pt2"))

    assert list(tuner.quantizable_layers(loaded)) == list(tuner.quantizable_layers(eager))
    assert "layers.1.query" in tuner.quantizable_layers(loaded) and "head" in tuner.quantizable_layers(loaded)
    embed = tuner.quantizable_layers(loaded)["embed"]  # read through the head's tied weight in the archive
    assert type(embed) is nn.Embedding and embed.weight.shape == (100, 32)
    torch.testing.assert_close(embed.weight, eager.embed.weight, rtol=0, atol=0)
    other = _tokens(3, 9, 1)  # another batch size and sequence length
    with torch.no_grad():
        out = loaded(**other)
        assert isinstance(out, tuple) and len(out) == 2
        _same_outputs(out, eager(**other))
        _same_outputs(loaded(other["input_ids"], other["attention_mask"]), eager(**other))

    data = [_tokens(4, 6, 2), _tokens(2, 11, 3)]
    eager_cal, loaded_cal = tuner.calibrate(eager, data), tuner.calibrate(loaded, data)
    assert list(loaded_cal.layers) == list(eager_cal.layers) and loaded_cal.layers["embed"].weight_only
    for plan in (loaded_cal.uniform_plan(), loaded_cal.uniform_plan().fallback(["embed"])):
        int8_loaded = tuner.apply_plan(loaded, plan, loaded_cal)
        assert isinstance(int8_loaded.get_submodule("head"), tuner.QuantizedLayer)
        with torch.no_grad():  # an FP32 tied embedding keeps reading the FP32 weight, as in the eager model
            _same_outputs(int8_loaded(**other), tuner.apply_plan(eager, plan, eager_cal)(**other))


class _Padded(nn.Module):
    """Token and position embeddings (the first with a padding row) and a classifier."""

    def __init__(self):
        super().__init__()
        self.tokens = nn.Embedding(20, 8, padding_idx=0)
        self.positions = nn.Embedding(16, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, ids):
        return self.fc(self.tokens(ids) + self.positions(torch.arange(ids.shape[1]))).mean(1)


def test_embeddings_keep_their_names_and_padding_row(tmp_path):
    torch.manual_seed(0)
    eager = _Padded().eval()
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, 20, (4, 6), generator=g), torch.randint(0, 20, (3, 9), generator=g)]
    loaded = load_exported(export_model(eager, data[0], tmp_path / "padded.pt2"))

    layers = tuner.quantizable_layers(loaded)
    assert list(layers) == list(tuner.quantizable_layers(eager)) == ["tokens", "positions", "fc"]
    assert type(layers["tokens"]) is nn.Embedding and layers["tokens"].padding_idx == 0
    assert layers["positions"].padding_idx is None and layers["positions"].num_embeddings == 16
    with torch.no_grad():
        _same_outputs(loaded(data[1]), eager(data[1]))
    eager_cal, loaded_cal = tuner.calibrate(eager, data), tuner.calibrate(loaded, data)
    plan = loaded_cal.uniform_plan()
    assert plan.int8_layers == ["fc", "positions", "tokens"]
    int8 = tuner.apply_plan(loaded, plan, loaded_cal)
    assert isinstance(int8.get_submodule("tokens"), tuner.QuantizedLayer) and type(loaded.get_submodule("tokens")) is nn.Embedding
    with torch.no_grad():
        _same_outputs(int8(data[1]), tuner.apply_plan(eager, plan, eager_cal)(data[1]))


def test_core_aten_archive_keeps_its_convolutions_and_says_why_linears_stay_fp32(tmp_path):
    """An archive made after run_decompositions(): convs are aten.convolution, linears addmm."""
    eager, x = digits.build_model(), digits.calibration_data()[0]
    torch.export.save(torch.export.export(eager, (x,)).run_decompositions(), tmp_path / "core.pt2")
    with pytest.warns(UserWarning, match="run_decompositions"):
        loaded = load_exported(tmp_path / "core.pt2")
    assert list(tuner.quantizable_layers(loaded)) == ["conv1", "conv2"]
    assert isinstance(loaded.get_submodule("conv2"), nn.Conv2d)
    with torch.no_grad():
        _same_outputs(loaded(x), eager(x))


class _FixedBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(x.reshape(4, -1))  # only exports for a batch of exactly 4


def test_export_falls_back_to_static_shapes_with_a_warning(tmp_path):
    model = _FixedBatch().eval()
    x = torch.randn(4, 2, 4)
    with pytest.warns(UserWarning, match="static shapes"):
        path = export_model(model, (x,), tmp_path / "fixed.pt2")
    with torch.no_grad():
        _same_outputs(load_exported(path)(x), model(x))


def test_export_model_rejects_what_it_cannot_save(tmp_path):
    with pytest.raises(InvalidArgumentError, match=r"\.pt2"):
        export_model(_FixedBatch(), torch.randn(4, 8), tmp_path / "model.onnx")
    with pytest.raises(InvalidArgumentError, match="nn.Module"):
        export_model(lambda x: x, torch.randn(4, 8), tmp_path / "model.pt2")


class _Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 4), nn.Linear(8, 4)

    def forward(self, x):
        if x.sum() > 0:  # control flow on data: torch.export cannot trace it
            return self.a(x)
        return self.b(x)


def test_an_export_failure_is_one_message_with_the_cause_and_what_to_do(tmp_path, capfd):
    with pytest.raises(InvalidArgumentError) as raised:
        export_model(_Branchy(), torch.randn(4, 8), tmp_path / "branchy.pt2")
    message = str(raised.value)
    assert message.startswith("torch.export could not trace _Branchy: its forward takes a Python branch on the "
                              "values of a tensor (control flow on data) at ")
    assert f"{__file__}:" in message and "`if x.sum() > 0:" in message
    assert "torch.cond" in message and "factory reference 'package.module:build_model'" in message
    log = Path(message.rsplit("torch's full output: ", 1)[1])
    assert "GuardOnDataDependentSymNode" in log.read_text()  # torch's noise is kept there ...
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""  # ... and not printed


def test_a_batch_that_does_not_fit_is_blamed_on_the_data_not_the_model(tmp_path, capfd):
    from tuner.errors import BatchMismatchError

    with pytest.raises(BatchMismatchError) as raised:
        export_model(nn.Sequential(nn.Linear(8, 4)), torch.randn(4, 5), tmp_path / "model.pt2")
    assert str(raised.value).startswith("the example batch (input: float32[4, 5]) does not fit the model: running it "
                                        "raised RuntimeError: mat1 and mat2 shapes cannot be multiplied")
    assert isinstance(raised.value, InvalidArgumentError) and not (tmp_path / "model.pt2").exists()
    assert capfd.readouterr().err == ""


# -- refused files ---------------------------------------------------------------------------------


class _Payload:
    """Unpickling this creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _rewrite(src: Path, dst: Path, edit) -> Path:
    """Copy an archive, `edit(name, data)` returning each entry's new bytes."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        prefix = zin.namelist()[0].split("/")[0] + "/"
        for info in zin.infolist():
            zout.writestr(info.filename, edit(info.filename[len(prefix):], zin.read(info)))
    return dst


def test_truncated_and_random_files_are_refused_by_name(digits_archive, tmp_path):
    data = digits_archive.read_bytes()
    cases = {
        "truncated.pt2": data[: len(data) // 2],
        "random.pt2": os.urandom(4096),
        "empty.pt2": b"",
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(QuanttuneError, match=name):
            load_exported(tmp_path / name)
    with pytest.raises(InvalidArchiveError, match="missing.pt2"):
        load_exported(tmp_path / "missing.pt2")
    with pytest.raises(InvalidArchiveError, match="cannot read"):
        load_exported(digits_archive.parent)  # a folder


def test_malicious_pickles_never_run(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Payload(marker))
    (tmp_path / "model.pt2").write_bytes(payload)
    torch.save({"model": _Payload(marker)}, tmp_path / "saved.pt2")  # a torch.save zip, not an archive
    for name in ("model.pt2", "saved.pt2"):
        with pytest.raises(InvalidArchiveError, match=name):
            load_exported(tmp_path / name)
    assert not marker.exists()


def _pickled_weight(marker):
    def edit(name, data):
        if name == "data/weights/model_weights_config.json":
            config = json.loads(data)
            for meta in config["config"].values():
                meta["use_pickle"] = True
            return json.dumps(config).encode()
        return pickle.dumps(_Payload(marker)) if name.startswith("data/weights/weight_") else data

    return edit, "stored as a pickle"


def _pickled_sample_inputs(marker):
    return (lambda name, data: pickle.dumps(_Payload(marker)) if name == "data/sample_inputs/model.pt" else data), "sample inputs"


def _code_in_shape_expression(marker):
    evil = f"+0*len(__import__('os').system('touch {marker}').__class__.__name__)".encode()

    def edit(name, data):
        return data.replace(b"integer=True)", b"integer=True)" + evil, 1) if name == "models/model.json" else data

    return edit, "shape expression"


def _code_in_parameter_name(marker):
    evil = f'fc2.b"), __import__("os").system("touch {marker}"), getattr(self, "c'

    def edit(name, data):
        if name in ("models/model.json", "data/weights/model_weights_config.json"):
            return data.replace(b'"fc2.bias"', json.dumps(evil).encode())
        return data

    return edit, "malformed entry"


def _custom_operator(marker):
    def edit(name, data):
        return data.replace(b"torch.ops.aten.relu.default", b"torch.ops.evil.run.default") if name == "models/model.json" else data

    return edit, "torch.ops.evil.run.default"


@pytest.mark.parametrize("attack", [_pickled_weight, _pickled_sample_inputs, _code_in_shape_expression,
                                    _code_in_parameter_name, _custom_operator])
def test_crafted_archives_are_refused_before_torch_reads_them(digits_archive, tmp_path, attack):
    """Each of these runs its payload under a bare torch.export.load (checked by hand in torch 2.13)."""
    marker = tmp_path / "pwned"
    edit, reason = attack(marker)
    path = _rewrite(digits_archive, tmp_path / "crafted.pt2", edit)
    with pytest.raises(InvalidArchiveError, match=reason):
        load_exported(path)
    assert not marker.exists()


def test_guard_code_in_an_archive_is_never_executed(digits_archive, tmp_path):
    marker = tmp_path / "pwned"

    def edit(name, data):
        if name != "models/model.json":
            return data
        program = json.loads(data)
        program["guards_code"] = [f"__import__('os').system('touch {marker}') == 0"]
        return json.dumps(program).encode()

    loaded = load_exported(_rewrite(digits_archive, tmp_path / "guards.pt2", edit))
    with torch.no_grad():
        loaded(digits.calibration_data()[0])
    assert not marker.exists()


# -- the real MiniLM -------------------------------------------------------------------------------

_MINILM = Path(__file__).resolve().parents[3] / "shared" / "bench" / "minilm_wordsim353"


@pytest.mark.slow
@pytest.mark.skipif(not (_MINILM / "case.py").exists(), reason="../shared/bench/minilm_wordsim353 is absent")
def test_minilm_round_trip(tmp_path):
    pytest.importorskip("transformers")
    sys.path.insert(0, str(_MINILM))
    try:
        import case
    finally:
        sys.path.remove(str(_MINILM))
    eager, data = case.build_model(), case.calibration_data()
    loaded = load_exported(export_model(eager, data[0], tmp_path / "minilm.pt2"))

    names = list(tuner.quantizable_layers(loaded))
    assert names == list(tuner.quantizable_layers(eager)) and len(names) == 39  # 36 Linears, 3 embeddings
    assert "encoder.encoder.layer.0.attention.self.query" in names
    assert type(loaded.get_submodule("encoder.embeddings.word_embeddings")) is nn.Embedding
    assert loaded.get_submodule("encoder.embeddings.word_embeddings").padding_idx == 0
    ids, mask = data[1]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids[:5, :4], mask[:5, :4]), eager(ids[:5, :4], mask[:5, :4]), rtol=1e-5, atol=1e-5)
    assert case.evaluate(loaded) == pytest.approx(case.evaluate(eager), abs=1e-3)
    cal = tuner.calibrate(loaded, data)
    int8 = tuner.apply_plan(loaded, cal.uniform_plan(), cal)
    assert 60 < case.evaluate(int8) < case.evaluate(eager)
