"""The randomness of the DP mechanism: noise and batch sampling.

Both are part of the mechanism: whoever can predict them can subtract the noise and knows each batch, and the
guarantee is gone. So each client's streams are seeded from the OS's entropy, never stored in a checkpoint or log,
and drawn afresh on every resume (a checkpoint resumed twice does not repeat its noise). Seeding them from the
run's public seed is an explicit, unsafe opt-in (``privacy.unsafe_seeded_randomness``) for research and tests.
"""

from __future__ import annotations

import secrets

import numpy as np
import torch

SAMPLER_STREAM, NOISE_STREAM, SERVER_STREAM, CLIENT_SAMPLING_STREAM = 0, 1, 2, 3


def client_seed(seed: int, index: int, stream: int = SAMPLER_STREAM) -> int:
    """The public seed of client ``index``'s sampler (stream 0) or noise (stream 1), derived from ``seed``."""
    return int(np.random.SeedSequence([seed, index, stream]).generate_state(1)[0])


def stream_generator(
    *, seeded: bool, seed: int, index: int, stream: int, device: torch.device | str = "cpu"
) -> torch.Generator:
    """A generator for one client stream: from the public ``seed`` when ``seeded``, else from 63 secret bits."""
    value = client_seed(seed, index, stream) if seeded else secrets.randbits(63)
    return torch.Generator(device=device).manual_seed(value)
