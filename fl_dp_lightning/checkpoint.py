"""Checkpoints that survive real use: written atomically, verified when read.

A kill or a full disk at any moment leaves the previous checkpoint intact (temporary file in the same folder,
fsync, rename), and a checkpoint damaged afterwards (truncated, bytes flipped inside a tensor, empty, not a
checkpoint at all) is refused in one line instead of silently training on garbage: every checkpoint carries a
SHA-256 of its weights, optimizer state, counters and federated state, recomputed on load.
"""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override

from fl_dp_lightning.config import ConfigError

CHECKPOINT_KEY = "fl_dp_lightning"
"""Where a checkpoint carries the federated state (settings, every client's accountant)."""
CHECKSUM_KEY = "fl_dp_lightning_sha256"
CHECKSUMMED = ("state_dict", "optimizer_states", "epoch", "global_step", CHECKPOINT_KEY)
"""The checkpoint entries the checksum covers: everything a resume restores that decides the result."""


def digest(value: Any) -> str:
    """SHA-256 of a nested structure of tensors, mappings, sequences and scalars, independent of dict order."""
    h = hashlib.sha256()
    _feed(h, value)
    return h.hexdigest()


def _feed(h: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, Mapping):
        h.update(b"{")
        for key in sorted(value, key=str):
            h.update(repr(key).encode())
            _feed(h, value[key])
        h.update(b"}")
    elif isinstance(value, (list, tuple)):
        h.update(b"[")
        for item in value:
            _feed(h, item)
        h.update(b"]")
    elif value is None or isinstance(value, (bool, int, float, str, bytes)):
        h.update(repr(value).encode())
    else:
        h.update(type(value).__qualname__.encode())  # not content: objects without a stable encoding


def checkpoint_digest(checkpoint: Mapping[str, Any]) -> str:
    """The checksum of a Lightning checkpoint's :data:`CHECKSUMMED` entries, or of any other saved dict whole
    (Lightning's spawn launcher hands weights back through the same IO)."""
    if "state_dict" in checkpoint:
        return digest({key: checkpoint.get(key) for key in CHECKSUMMED})
    return digest(checkpoint)


class VerifiedCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with atomic local writes and a checksum verified on every load.

    Remote paths (``s3://``...) are written by Lightning's own writer; the checksum is added and verified there too.
    """

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        checkpoint = {**checkpoint, CHECKSUM_KEY: checkpoint_digest(checkpoint)}
        if not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        write_atomically(Path(path), lambda f: torch.save(checkpoint, f))
        return None

    @override
    def load_checkpoint(
        self, path: Any, map_location: Callable | None = lambda storage, loc: storage, weights_only: bool | None = None
    ) -> dict[str, Any]:
        def refuse(what: str) -> ConfigError:
            return ConfigError(f"checkpoint {path}: {what}; resume from another checkpoint or start anew")

        if _is_local_file_protocol(path):
            local = Path(path)
            if not local.exists():
                raise ConfigError(f"checkpoint {path}: no such file")
            if local.is_dir():
                raise ConfigError(f"checkpoint {path}: is a folder; give the .ckpt file inside it")
            if local.stat().st_size == 0:
                raise refuse("the file is empty (a write was cut off)")
        try:
            checkpoint = super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except Exception as err:  # torch.load's errors for damaged files vary: zip, pickle, EOF, unicode
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise refuse(f"not a readable checkpoint, truncated or damaged ({first[:160]})") from err
        if not isinstance(checkpoint, dict):
            raise refuse(f"holds a {type(checkpoint).__name__}, not a checkpoint")
        expected = checkpoint.pop(CHECKSUM_KEY, None)
        if expected is None:
            raise refuse("carries no checksum: it was not written by fl_dp_lightning's federated strategy")
        if checkpoint_digest(checkpoint) != expected:
            raise refuse("checksum mismatch: the file was damaged after it was written")
        return checkpoint


STORAGE_ERRORS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT}
"""Write errors of the folder itself (full, read-only, forbidden), as opposed to errors in what is written."""


def write_atomically(path: Path, write: Callable[[Any], None]) -> None:
    """Calls ``write(binary_file)`` on a temporary file beside ``path``, then moves it onto ``path`` durably.

    Temporary files that an earlier, killed write left beside ``path`` are removed first. A full disk or a
    read-only folder is refused in one line naming the folder; the previous file at ``path`` stays intact.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            stale.unlink(missing_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise storage_error(path, err) from err
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        cause = next((e for e in (err, err.__cause__, err.__context__) if isinstance(e, OSError)), None)
        if cause is not None and cause.errno in STORAGE_ERRORS:
            raise storage_error(path, cause) from err
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)  # the rename itself survives a power cut
    finally:
        os.close(folder)


def storage_error(path: Path, err: OSError) -> ConfigError:
    """One line for a folder that cannot take a file (full, read-only, forbidden)."""
    kept = f"; the previous {path.name} there is intact" if path.exists() else ""
    return ConfigError(
        f"cannot write {path.name} in {path.parent}: {err.strerror or err}; free space there or choose a writable "
        f"run folder (hydra.run.dir=...){kept}"
    )
