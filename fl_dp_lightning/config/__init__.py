"""Typed configuration: one dataclass per Hydra group, validated on construction.

The same dataclasses are the Python API (``FederatedDPStrategy(privacy=PrivacyConfig(...))``) and the
Hydra schema (registered in the ConfigStore by :func:`register_configs`), so a value is checked the same
way whichever door it comes through. Every error names the full config key and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fl_dp_lightning.config.audit import AuditConfig
from fl_dp_lightning.config.choices import (
    ACCELERATORS,
    ACCOUNTANTS,
    AUDIT_METHODS,
    CLIENT_FAILURES,
    CLIENT_RUNTIMES,
    CLIENT_SAMPLINGS,
    DATA_FEATURES,
    DATA_SOURCES,
    ENGINE_LOSSES,
    ENGINES,
    LOSS_REDUCTIONS,
    MEMORY_FORMATS,
    MIN_NOISE_MULTIPLIER,
    NORM_FIXES,
    PARTITIONS,
    PER_EXAMPLE,
    RDP_CONVERSIONS,
    SERVER_OPTIMIZERS,
    SYFT_APPROVALS,
    USER_ACCOUNTANTS,
)
from fl_dp_lightning.config.client import ClientConfig, ClientOverride, SyftConfig, client_override
from fl_dp_lightning.config.data import DataConfig
from fl_dp_lightning.config.errors import ConfigError, require
from fl_dp_lightning.config.privacy import PrivacyConfig, UserPrivacyConfig
from fl_dp_lightning.config.run import EngineConfig, HardwareConfig, TrainerConfig
from fl_dp_lightning.config.server import SecureAggregationConfig, ServerConfig

__all__ = [
    "DATA_SOURCES",
    "DATA_FEATURES",
    "CLIENT_RUNTIMES",
    "SYFT_APPROVALS",
    "PARTITIONS",
    "CLIENT_SAMPLINGS",
    "CLIENT_FAILURES",
    "ACCOUNTANTS",
    "RDP_CONVERSIONS",
    "LOSS_REDUCTIONS",
    "ACCELERATORS",
    "NORM_FIXES",
    "MIN_NOISE_MULTIPLIER",
    "SERVER_OPTIMIZERS",
    "ENGINES",
    "USER_ACCOUNTANTS",
    "ENGINE_LOSSES",
    "PER_EXAMPLE",
    "MEMORY_FORMATS",
    "AUDIT_METHODS",
    "AuditConfig",
    "ClientConfig",
    "ClientOverride",
    "SyftConfig",
    "client_override",
    "DataConfig",
    "ConfigError",
    "require",
    "PrivacyConfig",
    "UserPrivacyConfig",
    "EngineConfig",
    "HardwareConfig",
    "TrainerConfig",
    "SecureAggregationConfig",
    "ServerConfig",
    "Config",
    "register_configs",
]


@dataclass
class Config:
    """The whole run, as ``train.py`` composes it."""

    data: DataConfig = field(default_factory=DataConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    user_privacy: UserPrivacyConfig = field(default_factory=UserPrivacyConfig)
    secure_aggregation: SecureAggregationConfig = field(default_factory=SecureAggregationConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    model: Any = field(default_factory=lambda: {"_target_": "fl_dp_lightning.models.LitClassifier"})
    """Hydra ``_target_`` spec of the LightningModule to train (any module; ``lr`` etc. as keys)."""


def register_configs() -> None:
    """Registers :class:`Config` as Hydra's ``schema`` so every override is type-checked."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="schema", node=Config)
