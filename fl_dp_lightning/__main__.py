"""``python -m fl_dp_lightning [group=option] [key=value ...]`` (or ``fl-dp-train``): the Hydra app, with the
config groups shipped in the package (``fl_dp_lightning/conf``); the run folder goes under ``outputs/`` here."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from fl_dp_lightning.cli import CONF_DIR, check_overrides
from fl_dp_lightning.cli import main as run_main
from fl_dp_lightning.config import register_configs


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def app(cfg: DictConfig) -> None:
    run_main(cfg)


def main() -> None:
    """Checks the overrides (a bad one: one line and exit 2, before Hydra starts the run), then runs the app."""
    register_configs()
    check_overrides(sys.argv[1:])
    app()


if __name__ == "__main__":
    main()
