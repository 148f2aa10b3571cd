"""How finely a bench case's metric resolves a budget: the FP32 model's output with random noise
added at a given SQNR, scored by the case's own evaluate (issue 16: at 0.25% the metric's noise,
not the plan's error, often decides whether a full-INT8 plan meets the budget).

    python benchmarks/bench_noise.py [--cases minilm_wordsim353 ...] [--db 17 20 24 30] [--seeds 8]

Per case and SQNR: mean, standard deviation, min and max of the drop (% of the FP32 baseline) over
`--seeds` noise draws. Gaussian noise of power (output power / 10^(dB/10)) is added to the model's
output (an embedding: renormalized to unit length, as the model's own output is). Compare with the
output SQNR of a plan on the calibration data (`tuner.quant.sqnr_db`; quanttune's full-INT8 MiniLM
plans: 17-18 dB plain, 20-24 dB smoothed).
"""

from __future__ import annotations

import argparse
import statistics

import torch
from cases import load_case

MINILM = ("minilm_wordsim353", "minilm_simlex999", "minilm_polarity")


class NoisyOutput(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, db: float, seed: int):
        super().__init__()
        self.model, self.db, self.generator = model, db, torch.Generator().manual_seed(seed)

    def forward(self, *args, **kwargs):
        out = self.model(*args, **kwargs)
        noise = torch.randn(out.shape, generator=self.generator) * (out.pow(2).mean() / 10 ** (self.db / 10)).sqrt()
        unit = torch.allclose(out.norm(dim=-1), torch.ones(()), atol=1e-4)
        noisy = out + noise
        return torch.nn.functional.normalize(noisy, dim=-1) if unit else noisy


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", nargs="+", default=MINILM)
    parser.add_argument("--db", type=float, nargs="+", default=(17, 20, 24, 30))
    parser.add_argument("--seeds", type=int, default=8)
    args = parser.parse_args()
    print(f"{'case':<19}{'SQNR dB':>8}{'mean':>9}{'std':>8}{'min':>9}{'max':>9}  drop in % of the baseline, "
          f"{args.seeds} draws")
    for name in args.cases:
        case = load_case(name)
        if case is None:
            continue
        model = case.build_model().eval()
        baseline = case.evaluate(model)
        for db in args.db:
            drops = [100 * (baseline - case.evaluate(NoisyOutput(model, db, seed))) / abs(baseline)
                     for seed in range(args.seeds)]
            print(f"{name:<19}{db:>8g}{statistics.fmean(drops):>+9.3f}{statistics.pstdev(drops):>8.3f}"
                  f"{min(drops):>+9.3f}{max(drops):>+9.3f}", flush=True)


if __name__ == "__main__":
    main()
