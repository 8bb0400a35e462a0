"""The benchmarks run end to end in their quick modes and write well-formed results (no timing is tested)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fl_dp_lightning.data.sources import DEBIAN_FASHION_MNIST

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def bench(script: str, out: Path, *args: str) -> dict:
    subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args, "--out", str(out)], check=True, capture_output=True,
        timeout=600, cwd=out.parent,
    )  # fmt: skip
    return json.loads(out.read_text())


def test_seed_round_quick_compares_both_implementations(tmp_path):
    result = bench("seed_round.py", tmp_path / "seed.json", "--quick", "--rounds", "1")
    assert set(result["median"]) == {"plain PyTorch + Opacus (seed style)", "FederatedDPStrategy (Lightning)"}
    assert result["speedup_strategy_over_plain"] > 0 and "synthetic" in result["data"]


def test_scale_clients_quick_measures_each_count(tmp_path):
    result = bench("scale_clients.py", tmp_path / "scale.json", "--clients", "2", "10", "--rounds", "1",
                   "--processes", "1")  # fmt: skip
    assert [row["clients"] for row in result["rows"]] == [2, 10]
    assert all(row["seconds_per_round"] and row["peak_rss_mb"] > 0 for row in result["rows"])


@pytest.mark.filterwarnings("ignore")
def test_scenarios_quick_fills_every_cell(tmp_path):
    result = bench("scenarios.py", tmp_path / "scenarios.json", "--quick")
    assert len(result["cells"]) == 12 and all(0 <= c["test_acc"] <= 1 for c in result["cells"])
    assert all(c["epsilon_max"] <= 3.0 for c in result["cells"])  # the same budget in every cell
    assert result["table"][0].startswith("| partition | FedAvg")


@pytest.mark.skipif(
    not (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").exists(), reason="dataset-fashion-mnist absent"
)
def test_speed_quick_times_every_path_and_both_engines_side_by_side(tmp_path):
    result = bench("speed.py", tmp_path / "speed.json", "--quick")
    assert len(result["seed_workload"]) == 7 and result["device_name"]
    assert all(row["median_s_per_client_epoch"] > 0 for row in result["seed_workload"].values())
    assert [row["clients"] for row in result["scale"]["rows"]] == [4, 8]
    assert all(row[k] > 0 for row in result["scale"]["rows"] for k in ("opacus_before", "opacus", "vectorized"))
    assert set(result["accuracy"]) == {"rounds", "opacus", "vectorized"} and result["profile_opacus_round"]
    assert (tmp_path / "speed.md").read_text().startswith("Device: ") and (tmp_path / "speed.png").exists()


def test_secure_aggregation_quick_reports_bytes_and_seconds(tmp_path):
    result = bench("secure_aggregation.py", tmp_path / "secagg.json", "--quick")
    assert [r["clients"] for r in result["rows"]] == [10, 30]
    for row in result["rows"]:
        assert row["bytes_per_client"] > row["plain_bytes_per_client"] and row["max_abs_error"] < 1e-4


@pytest.mark.filterwarnings("ignore")
def test_user_level_quick_fills_every_epsilon_and_the_no_dp_cell(tmp_path):
    result = bench("user_level.py", tmp_path / "user.json", "--quick")
    assert [c["target_epsilon"] for c in result["cells"]] == [1.0, 3.0, 8.0, None]
    assert all(c["user_epsilon"] <= c["target_epsilon"] for c in result["cells"][:3])
    assert result["cells"][-1]["user_epsilon"] is None and result["table"][-1].startswith("| no DP")


def test_grad_sample_modes_quick_times_each_mode(tmp_path):
    result = bench("grad_sample_modes.py", tmp_path / "modes.json", "--quick")
    assert [(r["mode"], r["batch"]) for r in result["rows"]] == [("hooks", 32), ("functorch", 32), ("ghost", 32)]
    assert all(r["ms_per_step"] > 0 and r["peak_rss_mb"] > 0 for r in result["rows"])


@pytest.mark.filterwarnings("ignore")
def test_frameworks_quick_runs_ours_plain_opacus_and_flower_each_in_its_own_process(tmp_path):
    result = bench("frameworks.py", tmp_path / "frameworks.json", "--quick")
    rows = result["results"]
    assert set(rows) == {"ours, engine=opacus", "ours, engine=vectorized", "ours, privacy off",
                         "plain PyTorch + Opacus", "Flower simulation + Opacus"}  # fmt: skip
    for name, row in rows.items():
        assert [r["round"] for r in row["history"]] == [1, 2] and row["end_to_end_seconds"] > 0
        assert all(0 <= r["val/acc"] <= 1 and r["seconds"] > 0 for r in row["history"])
        spent = [r["epsilon_max"] for r in row["history"]]
        assert spent == [None, None] if name == "ours, privacy off" else 0 < spent[0] < spent[1]

    def epsilons(name):
        return [r["epsilon_max"] for r in rows[name]["history"]]

    # same split and schedule: both engines spend the same privacy, and so do both references
    assert epsilons("ours, engine=opacus") == epsilons("ours, engine=vectorized")
    assert epsilons("plain PyTorch + Opacus") == epsilons("Flower simulation + Opacus")
    assert result["machine"]["flwr"] and (tmp_path / "frameworks.md").read_text().startswith("| implementation")
    assert (tmp_path / "frameworks.png").exists()


def test_audit_quick_sets_each_lower_bound_beside_its_printed_epsilon(tmp_path):
    result = bench("audit.py", tmp_path / "audit.json", "--quick")
    assert [(r["setting"], r["method"]) for r in result["rows"]] == [
        ("seed workload, Dirac canaries, engine=opacus", "one_run"),
        ("synthetic, noise 20 accounted, none added (broken)", "one_run"),
        ("many-run game: synthetic, no DP", "many_runs"),
    ]
    one_run, broken, many = result["rows"]
    for row in (one_run, broken):
        assert 0 <= row["epsilon_lower_bound"] and 0 <= row["correct_guesses"] <= row["guesses"] == 10
    assert many["guesses"] == 4 and many["epsilon"] is None and 0 <= many["correct_guesses"] <= 4
    assert result["table"][0].startswith("| setting | method | printed epsilon | lower bound")
    assert (tmp_path / "audit.md").exists() and (tmp_path / "audit.png").exists()
