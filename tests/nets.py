"""Small torch modules for the tests, importable by name on Spark's Python workers."""

from __future__ import annotations

import torch
import torch.nn as nn


def seed_mlp() -> nn.Sequential:
    """The seed program's model (examples/simple_dnn.py): MNIST 784-256-256-10 with Softmax."""
    return nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                         nn.Linear(256, 10), nn.Softmax(dim=1))


class TwoLayer(nn.Module):
    """A non-Sequential classifier: two linear layers with a ReLU between."""

    def __init__(self, n_in: int = 5, hidden: int = 8, n_out: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(n_in, hidden)
        self.fc2 = nn.Linear(hidden, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class AutoEncoder(nn.Module):
    """An autoencoder whose target is its input."""

    def __init__(self, n_in: int = 5, code: int = 2) -> None:
        super().__init__()
        self.enc = nn.Linear(n_in, code)
        self.dec = nn.Linear(code, n_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dec(torch.tanh(self.enc(x)))


class CompileProbe(nn.Module):
    """Learns only when compiled: in eager mode its output is multiplied by zero (no gradient),
    under ``torch.compile`` tracing it is a plain linear layer."""

    def __init__(self, n_in: int = 5, n_out: int = 3) -> None:
        super().__init__()
        self.fc = nn.Linear(n_in, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = 1.0 if torch.compiler.is_compiling() else 0.0
        return self.fc(x) * scale


class BNConvNet(nn.Module):
    """A small CNN with BatchNorm (running statistics are buffers) over flat ``side*side`` images."""

    def __init__(self, side: int = 14, classes: int = 10, dropout: float = 0.0) -> None:
        super().__init__()
        self.side = side
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(16 * (side // 4) ** 2, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.view(-1, 1, self.side, self.side)))


class NoisyInTraining(nn.Module):
    """A linear classifier behind heavy dropout: deterministic only in eval mode."""

    def __init__(self, n_in: int = 5, n_out: int = 3) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(n_in, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(x))


class LogSoftmaxNLL(nn.Module):
    """A user's own cross-entropy: takes class indices (int64) only, as ``nll_loss`` does."""

    def forward(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.nll_loss(torch.log_softmax(out, dim=1), target)


class FrozenEmbeddingLSTM(nn.Module):
    """Token ids (as floats) -> a frozen embedding -> an LSTM -> a classifier head."""

    def __init__(self, vocab: int = 20, dim: int = 8, hidden: int = 12, classes: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.emb.weight.requires_grad_(False)
        self.rnn = nn.LSTM(dim, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(self.emb(x.long()))
        return self.head(h[:, -1])


class SlowTwoLayer(TwoLayer):
    """:class:`TwoLayer` whose training forward pass takes at least ``delay_s`` (for tests that
    watch a fit while it runs)."""

    def __init__(self, n_in: int = 5, hidden: int = 8, n_out: int = 3, delay_s: float = 0.1) -> None:
        super().__init__(n_in, hidden, n_out)
        self.delay_s = delay_s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            import time

            time.sleep(self.delay_s)
        return super().forward(x)
