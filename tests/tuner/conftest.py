import pytest
import torch
from torch import nn

from tuner.examples import digits


@pytest.fixture(scope="session")
def digits_model():
    return digits.build_model()


@pytest.fixture(scope="session")
def digits_batches():
    return digits.calibration_data()


class Block(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.up, self.down = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, h, mask):
        scores = self.query(h) @ self.key(h).transpose(1, 2) / h.shape[-1] ** 0.5
        scores = scores.masked_fill(mask[:, None, :] == 0, -1e9)
        h = self.norm1(h + torch.softmax(scores, -1) @ self.value(h))
        return self.norm2(h + self.down(torch.nn.functional.gelu(self.up(h))))


class TinyEncoder(nn.Module):
    """A small transformer with keyword inputs and a tuple output, like a Hugging Face encoder."""

    def __init__(self, vocab=50, dim=32):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layer = Block(dim)
        self.head = nn.Linear(dim, 8)

    def forward(self, input_ids, attention_mask):
        h = self.layer(self.embed(input_ids), attention_mask)
        return self.head(h).mean(1), h


@pytest.fixture
def tiny_encoder():
    torch.manual_seed(0)
    return TinyEncoder().eval()


@pytest.fixture
def encoder_batches():
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, 50, (8, 6), generator=g), "attention_mask": torch.ones(8, 6, dtype=torch.long)}
            for _ in range(3)]
