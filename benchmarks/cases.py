"""Load the real benchmark cases from ../shared/bench (present on developer machines and CI only)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1].parent / "shared" / "bench"
CASES = ("digits_cnn", "minilm_wordsim353")
DERIVED = ("minilm_simlex999", "minilm_polarity")  # built on minilm_wordsim353 (benchmarks/minilm_cases.py)


def load_case(name: str):
    """The case module (build_model, calibration_data, evaluate), or None when it is not here."""
    import bench_onnx

    if name in bench_onnx.VISION:  # full-size torchvision architectures trained on the digits, cached
        import types

        batches, evaluate = bench_onnx.digits_data(bench_onnx.VISION_SIZE)
        return types.SimpleNamespace(build_model=lambda: bench_onnx.trained_vision_model(name, bench_onnx.CACHE),
                                     calibration_data=lambda: batches, evaluate=evaluate)
    if name in DERIVED:
        import minilm_cases

        base = load_case("minilm_wordsim353")
        return None if base is None else getattr(minilm_cases, name.removeprefix("minilm_"))(base)
    path = BENCH / name / "case.py"
    if not path.exists():
        print(f"skip {name}: {path} not found (benchmarks need ../shared/bench)", file=sys.stderr)
        return None
    spec = importlib.util.spec_from_file_location(f"bench_case_{name}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError as exc:
        print(f"skip {name}: {exc} (pip install -c constraints.txt -e '.[bench]')", file=sys.stderr)
        return None
    return module
