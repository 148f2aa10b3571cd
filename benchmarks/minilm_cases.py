"""Two more MiniLM cases built from data that ships in installed wheels, for the "cases of the same
kind that you do not see" of issue 16 (the shared bench has one transformer case).

- `minilm_simlex999`: the same model and contract as `minilm_wordsim353`, scored on SimLex-999
  (Hill et al. 2015: 999 word pairs, similarity rather than relatedness), Spearman x100.
- `minilm_polarity`: sentence sentiment, Pang & Lee's movie-review polarity sentences (200, half
  positive, `pang_lee_polarity.cor` in the gensim wheel). A logistic-regression head is trained
  once on the FP32 embeddings of 100 sentences (balanced, fixed order); the metric is the ROC AUC
  x100 of that fixed head on the other 100 sentences as embedded by the model under test (2,500
  positive/negative pairs: finer steps than accuracy on 100 sentences). Calibration: the 100
  training sentences.

Both reuse `minilm_wordsim353`'s model, tokenizer and data files (../shared/bench).
"""

from __future__ import annotations

import hashlib
import types

import numpy as np
import torch


def _calibration_words(base, exclude: set[str], count: int = 256):
    vocab = set()
    with open(base._data("questions-words.txt"), encoding="utf8") as f:
        for line in f:
            if not line.startswith(":"):
                vocab.update(w.lower() for w in line.split())
    return sorted(vocab - exclude, key=lambda w: hashlib.md5(w.encode()).hexdigest())[:count]


def simlex999(base) -> types.SimpleNamespace:
    rows = []
    with open(base._data("simlex999.txt"), encoding="utf8") as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            a, b, s = line.rstrip("\n").split("\t")[:3]
            rows.append((a.lower(), b.lower(), float(s)))
    words = sorted({w for a, b, _ in rows for w in (a, b)})
    index = {w: i for i, w in enumerate(words)}
    ia, ib = torch.tensor([index[a] for a, _, _ in rows]), torch.tensor([index[b] for _, b, _ in rows])
    human = np.array([s for _, _, s in rows])
    test = base._batches(words)

    @torch.no_grad()
    def evaluate(model) -> float:
        from scipy.stats import spearmanr

        model.eval()
        e = torch.nn.functional.normalize(torch.cat([model(*b) for b in test]).double(), dim=-1)
        return 100.0 * float(spearmanr((e[ia] * e[ib]).sum(1).numpy(), human)[0])

    return types.SimpleNamespace(build_model=base.build_model, evaluate=evaluate,
                                 calibration_data=lambda: base._batches(_calibration_words(base, set(words))))


def polarity(base) -> types.SimpleNamespace:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    texts, labels = [], []
    with open(base._data("pang_lee_polarity.cor"), encoding="latin-1") as f:  # the original release's encoding
        for line in f:
            label, _, text = line.strip().partition(" ")
            texts.append(text)
            labels.append(1 if label == "__label__pos" else 0)
    order = sorted(range(len(texts)), key=lambda i: hashlib.md5(texts[i].encode()).hexdigest())
    pos, neg = [i for i in order if labels[i]], [i for i in order if not labels[i]]
    train, test = pos[: len(pos) // 2] + neg[: len(neg) // 2], pos[len(pos) // 2:] + neg[len(neg) // 2:]
    train_batches, test_batches = base._batches([texts[i] for i in train]), base._batches([texts[i] for i in test])
    y_train, y_test = np.array([labels[i] for i in train]), np.array([labels[i] for i in test])

    @torch.no_grad()
    def embed(model, batches) -> np.ndarray:
        model.eval()
        return torch.cat([model(*b) for b in batches]).double().numpy()

    head = LogisticRegression(C=10.0, max_iter=2000).fit(embed(base.build_model(), train_batches), y_train)

    def evaluate(model) -> float:
        return 100.0 * float(roc_auc_score(y_test, head.decision_function(embed(model, test_batches))))

    return types.SimpleNamespace(build_model=base.build_model, evaluate=evaluate,
                                 calibration_data=lambda: train_batches)
