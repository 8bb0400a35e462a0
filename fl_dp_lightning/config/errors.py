"""The one error type for refused input, and its one-line form."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A refused input: a config value, a data set, a module, a Trainer setting or a checkpoint.

    The message is one line that names the key (or file) and the fix; ``train.py`` prints it and exits with 2.
    """


def require(ok: bool, key: str, value: Any, rule: str) -> None:
    """Raises :class:`ConfigError` ``"<key>=<value>: <rule>"`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key}={value!r}: {rule}")
