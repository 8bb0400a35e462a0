"""Secure aggregation (Bonawitz et al. 2017), simulated faithfully: the server learns only the sum of the updates.

Each client encodes its update in fixed point as integers mod 2^bits and adds masks that cancel in the sum:
for every neighbour a pairwise mask from a seed the two agree on (Diffie-Hellman over RFC 3526's 2048-bit group:
the server never sees the seed), with opposite signs on the two sides, plus a self mask from a seed of its own.
Masks are a cryptographic PRG's output (SHAKE-256), not torch's generator. Each client splits its DH secret key
and its self-mask seed into t-of-n Shamir shares for its neighbours. When clients drop out after masking, the
survivors reveal the dropped clients' key shares (so the server can remove their pairwise masks) and the
survivors' self-mask shares (never both for one client); with fewer than t survivors a neighbourhood cannot be
recovered and the round is refused. What the server code holds: masked integer vectors, their modular sum,
revealed shares, and the decoded sum.

In a deployment the clients would also authenticate their keys through a PKI and run the protocol over a network
with a malicious-server defence (consistency checks, signatures); the simulation runs every party in one process.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from fl_dp_lightning.config import ConfigError, SecureAggregationConfig
from fl_dp_lightning.server.aggregate import averaged_keys, finish_average

DH_PRIME = int(
    "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74020BBEA63B139B22514A08798E3404DDEF9519B3CD3A4"
    "31B302B0A6DF25F14374FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6F406B7EDEE386BFB5A899FA5AE9F24117C"
    "4B1FE649286651ECE45B3DC2007CB8A163BF0598DA48361C55D39A69163FA8FD24CF5F83655D23DCA3AD961C62F356208552BB9ED5290"
    "77096966D670C354E4ABC9804F1746C08CA18217C32905E462E36CE3BE39E772C180E86039B2783A2EC07A28FB5C55DF06F4C52C9DE2B"
    "CBF6955817183995497CEA956AE515D2261898FA051015728E5A8AACAA68FFFFFFFFFFFFFFFF",
    16,
)
"""RFC 3526 group 14: the 2048-bit MODP prime, generator 2."""
DH_GENERATOR = 2
SECRET_BITS = 256
"""Bits of a DH secret exponent and of a self-mask seed (a short exponent: twice the 128-bit security level)."""
SHAMIR_PRIME = 2**521 - 1
"""The field of the Shamir shares (a Mersenne prime above every secret)."""


# ----------------------------------------------------------------------------------- fixed-point encoding


WEIGHT_HEADROOM = 8.0
"""Under FedAvg of weights, how far beyond the global model's largest weight a client's weights are allowed for in
the capacity check (weights have no public bound; a client's DP update moves them little per round)."""


def capacity(*, bits: int, scale: float, clients: int) -> float:
    """The largest value each of ``clients`` contributions may hold so that their sum stays in the signed range."""
    return 2.0 ** (bits - 1) / (clients * scale)


def check_capacity(largest: float, *, bits: int, scale: float, clients: int, bound: str) -> None:
    """Refuses, before a round's clients train, settings under which ``clients`` contributions of up to ``largest``
    (a public bound, described by ``bound``) could overflow the modulus."""
    limit = capacity(bits=bits, scale=scale, clients=clients)
    if largest >= limit:
        raise ConfigError(
            f"secure_aggregation: {clients} contributions of up to {largest:.4g} ({bound}) overflow 2^{bits - 1} at "
            f"scale {scale:g} (at most {limit:.4g} each); raise secure_aggregation.bits or lower "
            "secure_aggregation.scale"
        )


def encode(values: np.ndarray, *, scale: float, bits: int, clients: int) -> np.ndarray:
    """Float values as integers mod 2^bits (``round(x * scale)``, negatives wrapped); refuses values whose sum over
    ``clients`` could overflow the signed range, quoting no value (they come from a client's update)."""
    scaled = np.rint(np.asarray(values, dtype=np.float64) * scale)
    if float(np.abs(scaled).max(initial=0.0)) >= 2.0 ** (bits - 1) / clients:
        raise ConfigError(
            f"secure_aggregation: a contribution overflows {bits} bits at scale {scale:g} over {clients} clients; "
            "raise secure_aggregation.bits or lower secure_aggregation.scale"
        )
    return scaled.astype(np.int64).view(np.uint64) & _mask(bits)


def decode(total: np.ndarray, *, scale: float, bits: int) -> np.ndarray:
    """The signed values a modular sum stands for, divided by ``scale`` (``bits`` at most 62)."""
    total = (total & _mask(bits)).astype(np.int64)
    signed = total - (total >= 2 ** (bits - 1)).astype(np.int64) * 2**bits
    return signed.astype(np.float64) / scale


def _mask(bits: int) -> np.uint64:
    return np.uint64(2**bits - 1)


def prg(seed: bytes, length: int, bits: int) -> np.ndarray:
    """``length`` pseudorandom integers mod 2^bits from SHAKE-256 of ``seed``."""
    words = np.frombuffer(hashlib.shake_256(seed).digest(8 * length), dtype="<u8")
    return words & _mask(bits)


# -------------------------------------------------------------------------------------------- Shamir


def shamir_split(secret: int, *, parties: list[int], threshold: int) -> dict[int, int]:
    """Shares of ``secret`` for each party (its index + 1 is its point), any ``threshold`` of which rebuild it."""
    coefficients = [secret] + [secrets.randbelow(SHAMIR_PRIME) for _ in range(threshold - 1)]
    return {
        party: sum(c * pow(party + 1, k, SHAMIR_PRIME) for k, c in enumerate(coefficients)) % SHAMIR_PRIME
        for party in parties
    }


def shamir_combine(shares: dict[int, int], threshold: int) -> int:
    """The secret from at least ``threshold`` shares (Lagrange interpolation at 0); refuses fewer."""
    if len(shares) < threshold:
        raise ConfigError(
            f"secure aggregation cannot recover a dropped client: {len(shares)} shares, {threshold} needed "
            f"(secure_aggregation.threshold); fewer clients may drop out, or lower the threshold"
        )
    points = [(party + 1, share) for party, share in list(shares.items())[:threshold]]
    secret = 0
    for i, (x_i, y_i) in enumerate(points):
        numerator = denominator = 1
        for j, (x_j, _) in enumerate(points):
            if i != j:
                numerator = numerator * -x_j % SHAMIR_PRIME
                denominator = denominator * (x_i - x_j) % SHAMIR_PRIME
        secret = (secret + y_i * numerator * pow(denominator, -1, SHAMIR_PRIME)) % SHAMIR_PRIME
    return secret


# ------------------------------------------------------------------------------------------ one round


def neighbours(count: int, degree: int | None, seed: int) -> list[set[int]]:
    """Who masks with whom: everyone (``degree`` None or at least count - 1), else a random ring-like graph in which
    each client is joined to ``degree`` others (SecAgg+, Bell et al. 2020); public, like the participants."""
    if degree is None or degree >= count - 1:
        return [set(range(count)) - {i} for i in range(count)]
    order = np.random.default_rng(seed).permutation(count)
    position = {int(client): p for p, client in enumerate(order)}
    half = max(1, degree // 2)
    return [{int(order[(position[i] + step) % count]) for step in range(-half, half + 1) if step} for i in range(count)]


def pair_seed(shared: int, a: int, b: int) -> bytes:
    """The mask seed of clients ``a`` and ``b`` from their Diffie-Hellman shared secret."""
    return hashlib.sha256(shared.to_bytes(256, "big") + f"{min(a, b)}:{max(a, b)}".encode()).digest()


@dataclass
class Client:
    """One client's side of a round: its keys, and the shares it holds of its neighbours' secrets."""

    index: int
    secret_key: int = field(default_factory=lambda: secrets.randbits(SECRET_BITS))
    self_seed: int = field(default_factory=lambda: secrets.randbits(SECRET_BITS))
    held: dict[str, dict[int, int]] = field(default_factory=lambda: {"key": {}, "self": {}})

    @property
    def public_key(self) -> int:
        return pow(DH_GENERATOR, self.secret_key, DH_PRIME)

    def mask(self, encoded: np.ndarray, public_keys: dict[int, int], graph: list[set[int]], bits: int) -> np.ndarray:
        """Its encoded update plus its self mask and its pairwise masks (+ for higher neighbours, - for lower)."""
        masked = encoded + prg(self.self_seed.to_bytes(32, "big"), len(encoded), bits)
        for other in graph[self.index]:
            seed = pair_seed(pow(public_keys[other], self.secret_key, DH_PRIME), self.index, other)
            pad = prg(seed, len(encoded), bits)
            masked = masked + pad if other > self.index else masked - pad
        return masked & _mask(bits)


class SecureRound:
    """One round of secure aggregation among ``count`` clients (every party simulated in this process).

    Args:
        count: the clients that were sent the round (their masks are set up before anyone trains).
        bits: the modulus is 2^bits.
        scale: fixed-point scale (values are rounded to multiples of 1 / scale).
        threshold: shares needed to rebuild a secret, as a fraction of a client's neighbourhood (it and its
            neighbours, who each hold one share), rounded up.
        degree: neighbours of each client (None: all others).
        seed: seeds the public neighbour graph.
    """

    def __init__(self, count: int, *, bits: int, scale: float, threshold: float, degree: int | None, seed: int):
        self.bits, self.scale, self.count = bits, scale, count
        self.graph = neighbours(count, degree, seed)
        self.clients = [Client(i) for i in range(count)]
        self.public_keys = {c.index: c.public_key for c in self.clients}  # what the server relays
        self.thresholds = [max(1, math.ceil(threshold * (len(self.graph[i]) + 1))) for i in range(count)]
        for client in self.clients:  # each client deals shares of its two secrets to its neighbourhood
            holders = sorted(self.graph[client.index] | {client.index})
            for kind, secret in (("key", client.secret_key), ("self", client.self_seed)):
                shares = shamir_split(secret, parties=holders, threshold=self.thresholds[client.index])
                for holder, share in shares.items():
                    self.clients[holder].held[kind].setdefault(client.index, {})[holder] = share
        self.masked_sum: np.ndarray | None = None  # the server's running modular sum
        self.received: list[int] = []
        self.bytes_sent: dict[int, int] = {}

    def submit(self, index: int, values: np.ndarray) -> None:
        """Client ``index`` encodes and masks its values; the server adds the masked vector to its sum."""
        client = self.clients[index]
        encoded = encode(values, scale=self.scale, bits=self.bits, clients=self.count)
        masked = client.mask(encoded, self.public_keys, self.graph, self.bits)
        self.bytes_sent[index] = masked.size * math.ceil(self.bits / 8) + 2 * len(self.graph[index]) * 66 + 256
        self.masked_sum = masked if self.masked_sum is None else (self.masked_sum + masked) & _mask(self.bits)
        self.received.append(index)

    def unmask(self, length: int) -> np.ndarray:
        """The decoded sum of the submitted values. Survivors reveal the dropped clients' key shares and the
        survivors' self-mask shares; the server rebuilds those secrets and removes what they masked."""
        bits, alive = self.bits, set(self.received)
        total = np.zeros(length, dtype=np.uint64) if self.masked_sum is None else self.masked_sum.copy()
        for index in range(self.count):
            holders = (self.graph[index] | {index}) & alive
            kind = "self" if index in alive else "key"
            shares = {h: self.clients[h].held[kind][index][h] for h in holders}
            secret = shamir_combine(shares, self.thresholds[index])
            if index in alive:
                total = total - prg(secret.to_bytes(32, "big"), length, bits)
                continue
            for other in self.graph[index] & alive:  # the dropped client's masks still sit in the survivors'
                seed = pair_seed(pow(self.public_keys[other], secret, DH_PRIME), index, other)
                pad = prg(seed, length, bits)
                total = total + pad if other > index else total - pad  # the survivor added -pad if other > index
        return decode(total & _mask(bits), scale=self.scale, bits=bits)


class SecureSum:
    """The round's FedAvg sum through secure aggregation: the interface of
    :class:`~fl_dp_lightning.server.aggregate.RunningAverage` (``add``, ``summed``, ``total_weight``, ``result``),
    but each client's weighted state enters the server only masked, and the server decodes only the sum.

    Args:
        clients: the round's clients, in order (set up before they train; those that never add dropped out).
        template: the global state (keys, shapes, dtypes and device of the result).
        only: the keys to sum (see :func:`~fl_dp_lightning.server.aggregate.averaged_keys`).
        config: bits, scale, threshold and neighbours.
        seed: seeds the public neighbour graph.
    """

    def __init__(
        self,
        clients: list[str],
        template: Mapping[str, Tensor],
        only: Collection[str] | None,
        config: SecureAggregationConfig,
        seed: int,
    ):
        self.only, self.template = only, template
        self.keys = averaged_keys(template, only)
        self.index = {name: i for i, name in enumerate(clients)}
        self.round = SecureRound(
            len(clients), bits=config.bits, scale=config.scale, threshold=config.threshold, degree=config.neighbors,
            seed=seed,
        )  # fmt: skip
        self.total_weight, self.count = 0.0, 0
        self._summed: dict[str, Tensor] | None = None

    def add(self, state: Mapping[str, Tensor], weight: float, client: str | None = None) -> None:
        """Client ``client`` masks ``weight * state``; the server adds it to the masked sum."""
        flat = torch.cat([(float(weight) * state[k].detach().double()).flatten().cpu() for k in self.keys])
        self.round.submit(self.index[client], flat.numpy())
        self.total_weight += float(weight)
        self.count += 1

    @property
    def summed(self) -> dict[str, Tensor]:
        """The decoded sum by key (float64), unmasked once."""
        if self._summed is None:
            length = sum(self.template[k].numel() for k in self.keys)
            flat = torch.from_numpy(self.round.unmask(length))
            parts = flat.split([self.template[k].numel() for k in self.keys])
            self._summed = {
                k: part.view(self.template[k].shape).to(self.template[k].device) for k, part in zip(self.keys, parts)
            }
        return self._summed

    def result(self, template: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The weighted average, as :meth:`RunningAverage.result` gives it."""
        return finish_average(template, self.summed, self.total_weight)
