"""Lightning's own LSTM language-model demo (`lightning.pytorch.demos.lstm.LightningLSTM`, imported as shipped),
federated and private.

The demo carries its LSTM's hidden state from one training step to the next (truncated backpropagation through
time across batches). Under DP-SGD that state carries one batch's records into the next batch's gradients, which
clipping does not bound, so the strategy refuses the demo as shipped, before training, naming `hidden` and the
fix. The fix is one line: start the hidden state anew in every step (`PrivateLSTM` below). `privacy.fix_modules`
swaps `nn.LSTM` for Opacus's `DPLSTM` (same weights, per-example gradients).

The demo downloads WikiText-2 in its `prepare_data`; here the text is a synthetic token stream in the demo's
format ((input, target) token sequences, target shifted by one), split among three clients, and `OfflineLSTM`
leaves the download out.

    python examples/lightning_lstm.py [--fast]
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
from lightning.pytorch.demos.lstm import LightningLSTM
from torch.utils.data import TensorDataset

from fl_dp_lightning import FederatedDataModule, FederatedDPStrategy, PrivacyConfig

VOCAB = 32


class OfflineLSTM(LightningLSTM):
    """The demo as shipped, less its WikiText-2 download (the data module brings the text)."""

    def prepare_data(self) -> None:
        pass


class PrivateLSTM(OfflineLSTM):
    """The demo with each step computed from its own batch alone."""

    def training_step(self, batch, batch_idx):
        self.hidden = None  # the one change: no state from the previous batch
        return super().training_step(batch, batch_idx)


def token_stream(n: int, length: int, seed: int) -> TensorDataset:
    """``n`` (input, target) sequences of ``length`` tokens where each token is the one before plus 1 (mod the
    vocabulary): a language an LSTM learns in a few steps."""
    starts = torch.randint(0, VOCAB, (n, 1), generator=torch.Generator().manual_seed(seed))
    tokens = (starts + torch.arange(length + 1)) % VOCAB
    return TensorDataset(tokens[:, :-1], tokens[:, 1:])


def federated_text(fast: bool) -> FederatedDataModule:
    length, records = (6, 48) if fast else (35, 3000)
    return FederatedDataModule(
        train=token_stream(records, length, 1),
        test=token_stream(100, length, 2),
        clients=["ana", "ben", "cai"],
        batch_size=4 if fast else 20,
        num_classes=VOCAB,
    )


def trainer(fast: bool) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=1 if fast else 3,
        strategy=FederatedDPStrategy(privacy=PrivacyConfig(fix_modules=True)),  # the line
        limit_val_batches=0,  # the demo has no validation_step
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=not fast,
    )


def main(argv: list[str] | None = None) -> tuple[str, dict[str, float]]:
    """The refusal of the demo as shipped, and the epsilons of the fixed demo's run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="short sequences, 1 round")
    args = parser.parse_args(argv)
    pl.seed_everything(0)
    try:
        trainer(args.fast).fit(OfflineLSTM(vocab_size=VOCAB), federated_text(args.fast))
        raise AssertionError("the demo as shipped carries its hidden state across steps and must be refused")
    except ValueError as refusal:
        refused = str(refusal)
    print(f"the demo as shipped: {refused}")
    run = trainer(args.fast)
    run.fit(PrivateLSTM(vocab_size=VOCAB), federated_text(args.fast))
    print(f"the demo, hidden state per step: epsilon per client {run.strategy.epsilons()}")
    return refused, run.strategy.epsilons()


if __name__ == "__main__":
    main()
