"""Federated DP training from the command line: ``python train.py [group=option] [key=value ...]``."""

import sys

import hydra
from omegaconf import DictConfig

from fl_dp_lightning.cli import check_overrides
from fl_dp_lightning.cli import main as run_main
from fl_dp_lightning.config import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    run_main(cfg)


if __name__ == "__main__":
    check_overrides(sys.argv[1:])  # a bad override: one line and exit 2, before Hydra starts the run
    main()
