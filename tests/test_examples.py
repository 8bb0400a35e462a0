"""The examples/ projects run as shipped (fast settings)."""

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_existing_project_learns_under_the_strategy():
    assert load("existing_project").main(["--fast"]) > 0.5  # chance is 0.1


@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader`")
def test_resnet_example_trains_a_private_round():
    epsilons = load("resnet_groupnorm").main(["--fast"])
    assert set(epsilons) == {"alice", "bob"} and all(e > 0 for e in epsilons.values())
