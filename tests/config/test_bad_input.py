"""train.py's error contract, value by value: every bad value ends the run before training with one line
``error: <key or file>...`` on stderr and exit status 2; valid edge values are accepted."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from fl_dp_lightning import cli
from fl_dp_lightning.data import sources

ROOT = Path(__file__).resolve().parents[2]
FAST = ["data=synthetic", "trainer.progress_bar=false", "trainer.rounds=1"]

# (overrides, what the one line must name): refused while composing, before any data is read
COMPOSE = [
    (["data=foo"], "data=foo: no such option"),
    (["data.name=cifar"], "data.name='cifar'"),
    (["data.eval_batch_size=0"], "data.eval_batch_size=0"),
    (["data.eval_batch_size=abc"], "data.eval_batch_size:"),
    (["data.synthetic_train_size=0"], "data.synthetic_train_size=0"),
    (["data.synthetic_test_size=-5"], "data.synthetic_test_size=-5"),
    (["client=foo"], "client=foo: no such option"),
    (["client.count=0"], "client.count=0"),
    (["client.count=-1"], "client.count=-1"),
    (["client.count=two"], "client.count:"),
    (["client.names=[a,a]"], r"client.names=\['a', 'a'\]: client names must be unique"),
    (["client.names=[a,b,c]"], "3 names for client.count=2"),
    (["client.names=[alice,'']"], r"client.names=\['alice', ''\]: every name must be a non-empty string"),
    (["client.partition=pathological"], "client.partition='pathological'"),
    (["client.dirichlet_alpha=0"], "client.dirichlet_alpha=0"),
    (["client.dirichlet_alpha=-1"], "client.dirichlet_alpha=-1"),
    (["client.dirichlet_alpha=inf"], "client.dirichlet_alpha=inf"),
    (["client.fraction=0"], "client.fraction=0"),
    (["client.fraction=1.5"], "client.fraction=1.5"),
    (["client.fraction=nan"], "client.fraction=nan"),
    (["client.proximal_mu=-1"], "client.proximal_mu=-1"),
    (["+client.overrides.carol.batch_size=8"], r"client.overrides=\['carol'\]: no such client"),
    (["+client.overrides.alice.batchsize=8"], r"client.overrides.alice=\['batchsize'\]: unknown key"),
    (["+client.overrides.alice.batch_size=0"], r"client.overrides.\*.batch_size=0"),
    (["server=sgd"], "server=sgd: no such option"),
    (["server.lr=0"], "server.lr=0"),
    (["engine=foo"], "engine=foo: no such option"),
    (["engine.name=jax"], "engine.name='jax'"),
    (["engine.loss=hinge"], "engine.loss='hinge'"),
    (["engine.clients_per_chunk=0"], "engine.clients_per_chunk=0"),
    (["engine=vectorized", "engine.per_example=hooks"], "engine.per_example='hooks'"),
    (["engine.memory_format=nhwc"], "engine.memory_format='nhwc'"),
    (["user_privacy=foo"], "user_privacy=foo: no such option"),
    (["user_privacy.clip=0"], "user_privacy.clip=0"),
    (["user_privacy.noise_multiplier=inf"], "user_privacy.noise_multiplier=inf"),
    (["user_privacy.accountant=moments"], "user_privacy.accountant='moments'"),
    (["user_privacy.target_quantile=1"], "user_privacy.target_quantile=1"),
    (["user_privacy.delta=1"], "user_privacy.delta=1"),
    (["secure_aggregation.bits=64"], "secure_aggregation.bits=64"),
    (["secure_aggregation.threshold=0"], "secure_aggregation.threshold=0"),
    (["secure_aggregation.threshold=0.5"], r"secure_aggregation.threshold=0.5: must be in \(0.5, 1\]"),
    (["secure_aggregation.neighbors=1"], "secure_aggregation.neighbors=1"),
    (["client.holdout_fraction=1"], "client.holdout_fraction=1"),
    (["client.sampling=epoch", "client.fraction=0.3"], "client.fraction=0.3: with client.sampling=epoch it must be"),
    (["user_privacy=dpftrl", "user_privacy.adaptive_clipping=true"], "adaptive_clipping=True: not accounted under"),
    (["user_privacy=dpfedavg", "user_privacy.mechanism=ftrl"], "user_privacy.mechanism='ftrl': choose one of"),
    (["model=foo"], "model=foo: no such option"),
    (["privacy.unsafe_release_class_counts=maybe"], "privacy.unsafe_release_class_counts"),
    (["privacy.noise_multiplier=0.05"], "privacy.noise_multiplier=0.05: below 0.1 epsilon runs into the hundreds"),
    (["privacy=foo"], "privacy=foo: no such option"),
    (["privacy.enabled=2"], "privacy.enabled=2: must be true or false"),
    (["privacy.enabled=maybe"], "privacy.enabled"),
    (["privacy.noise_multiplier=-1"], "privacy.noise_multiplier=-1"),
    (["privacy.noise_multiplier=0"], "privacy.noise_multiplier=0.0: must be > 0 .*privacy=none"),
    (["privacy.noise_multiplier=inf"], "privacy.noise_multiplier=inf"),
    (["privacy.noise_multiplier=nan"], "privacy.noise_multiplier=nan"),
    (["privacy.max_grad_norm=0"], "privacy.max_grad_norm=0"),
    (["privacy.max_grad_norm=inf"], "privacy.max_grad_norm=inf"),
    (["privacy.max_grad_norm=nan"], "privacy.max_grad_norm=nan"),
    (["privacy.delta=0"], "privacy.delta=0"),
    (["privacy.delta=1"], "privacy.delta=1"),
    (["privacy.delta=nan"], "privacy.delta=nan"),
    (["privacy.accountant=moments"], "privacy.accountant='moments'"),
    (["privacy.accountant=prv"], "privacy.accountant='prv': .*use privacy.accountant=pld"),
    (["privacy.rdp_conversion=foo"], "privacy.rdp_conversion='foo'"),
    (["privacy.rdp_conversion=classic"], "privacy.rdp_conversion='classic': applies to privacy.accountant=rdp"),
    (["privacy.target_epsilon=0"], "privacy.target_epsilon=0"),
    (["privacy.target_epsilon=inf"], "privacy.target_epsilon=inf"),
    (["privacy.target_epsilon=-2"], "privacy.target_epsilon=-2"),
    (["privacy.max_epsilon=0"], "privacy.max_epsilon=0"),
    (["privacy.max_epsilon=nan"], "privacy.max_epsilon=nan"),
    (["privacy=gdp", "privacy.max_epsilon=3"], "privacy.max_epsilon=3.0: .*accountant=gdp is an approximation"),
    (["privacy=gdp", "privacy.target_epsilon=3"], "privacy.target_epsilon=3.0: .*gdp"),
    (["privacy.poisson_sampling=false", "privacy.target_epsilon=3"], "needs a proven epsilon"),
    (["privacy.poisson_sampling=3"], "privacy.poisson_sampling=3: must be true or false"),
    (["privacy.loss_reduction=max"], "privacy.loss_reduction='max'"),
    (["privacy.fix_modules=yes"], "privacy.fix_modules='yes': must be true or false"),
    (["privacy.secure_mode=true", "privacy.unsafe_seeded_randomness=true"], "privacy.secure_mode=True: contradicts"),
    (["+privacy.noise_multipler=1"], r"privacy.noise_multipler \(did you mean privacy.noise_multiplier\?\)"),
    (["privacy.noise_multipler=1"], r"privacy.noise_multipler \(did you mean privacy.noise_multiplier\?\)"),
    (["+trainer.epochs=3"], r"trainer.epochs \(did you mean trainer.local_epochs\?\): unknown key"),
    (["hardware=tpu"], "hardware=tpu: no such option"),
    (["hardware.accelerator=tpu"], "hardware.accelerator='tpu'"),
    (["hardware.accelerator=gpu"], "hardware.accelerator='gpu': no CUDA GPU"),
    (["hardware.devices=0"], "hardware.devices=0"),
    (["hardware.num_nodes=0"], "hardware.num_nodes=0"),
    (["hardware.num_nodes=2"], "hardware.num_nodes=2: several nodes need a launcher"),
    (["trainer=foo"], "trainer=foo: no such option"),
    (["trainer.rounds=0"], "trainer.rounds=0"),
    (["trainer.rounds=abc"], "trainer.rounds:"),
    (["trainer.local_epochs=0"], "trainer.local_epochs=0"),
    (["trainer.batch_size=0"], "trainer.batch_size=0"),
    (["trainer.seed=-1"], "trainer.seed=-1"),
    (["trainer.log_every_n_steps=0"], "trainer.log_every_n_steps=0"),
    (["trainer.ckpt_path=/nonexistent/last.ckpt"], "trainer.ckpt_path='/nonexistent/last.ckpt': no such file"),
    (["trainer.ckpt_path=/tmp"], "trainer.ckpt_path='/tmp': is a folder"),
    (["trainer.progress_bar=2"], "trainer.progress_bar=2: must be true or false"),
    (["foo=1"], "foo: unknown key"),
    (["audit=foo"], "audit=foo: no such option"),
    (["audit.method=many"], "audit.method='many': choose one of"),
    (["audit=one_run", "audit.canaries=1"], "audit.canaries=1: must be >= 2"),
    (["audit=one_run", "audit.guesses=3"], "audit.guesses=3: must be even"),
    (["audit=one_run", "audit.guesses=2000"], "audit.guesses=2000: must be even, in \\[2, audit.canaries=1000\\]"),
    (["audit=one_run", "audit.confidence=1"], r"audit.confidence=1.0: must be in \(0, 1\)"),
    (["audit=one_run", "audit.canary_scale=0"], "audit.canary_scale=0.0: must be > 0"),
    (["audit=one_run", "audit.canary=gradient"], "audit.canary='gradient': choose one of \\('dirac', 'input'\\)"),
    (["audit=one_run", "audit.canary_norm=inf"], "audit.canary_norm=inf: must be > 0 and finite"),
    (["privacy.delta=[1"], "cannot parse the override"),
]


def one_error_line(capsys, call) -> str:
    with pytest.raises(SystemExit) as stopped:
        call()
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == 1 and err[-1] == errors[0] and not any("Traceback" in line for line in err), err
    return errors[0]


@pytest.mark.parametrize(("overrides", "names"), COMPOSE, ids=[" ".join(o) for o, _ in COMPOSE])
def test_a_bad_value_is_refused_in_one_line_with_exit_2_before_hydra_starts(capsys, overrides, names):
    line = one_error_line(capsys, lambda: cli.check_overrides(overrides))
    assert re.search(names, line), line


def fake_fashion_mnist(tmp_path: Path, monkeypatch) -> list[str]:
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST", tmp_path)
    return ["data=fashion_mnist"]


# refused once data, module or checkpoint are loaded: still one line, exit 2, before any training step
LOADED = [
    (["privacy.delta=0.01"], "privacy.delta=0.01 is not below 1/n = 1/1000 for client 'alice'"),
    (["trainer.batch_size=5000"], "client 'alice' holds 1000 examples, fewer than the batch size 5000"),
    (["client.count=3000", "client.names=[]"], "client.count=3000: cannot split 2000 examples among 3000 clients"),
    (
        ["client=dirichlet", "client.count=40", "client.dirichlet_alpha=0.01", "data.synthetic_train_size=100"],
        "hold no training examples: use fewer clients",
    ),
    (["privacy.target_epsilon=0.0001"], "privacy.target_epsilon=0.0001 is out of reach"),
    (
        ["model._target_=collections.OrderedDict"],
        "model._target_='collections.OrderedDict': must build a LightningModule",
    ),
    (["model.lr=nan"], "model.lr=nan: must be a number > 0"),  # refused before training, not after a round
    (["model.activation=sigmoid"], "model.activation='sigmoid': choose one of ('relu', 'tanh')"),
    (
        ["user_privacy=adaptive", "user_privacy.noise_multiplier=0.5", "user_privacy.count_noise=0.1"],
        "user_privacy.count_noise=0.1: count noise 0.1 leaves nothing",
    ),
    (["user_privacy=dpfedavg", "client.fraction=0.5"], "uniform client sampling: DP-FedAvg is accounted for"),
    (["user_privacy=dpftrl", "client.fraction=0.5"], "with user_privacy.mechanism=dp_ftrl: its accounting needs"),
    (["user_privacy=dpfedavg", "user_privacy.delta=0.6"], "user_privacy.delta=0.6 is not below 1 / clients = 1/2"),
    (["privacy.delta=1e-300"], "privacy.delta=1e-300: the pld accountant gives epsilon = inf for client 'alice'"),
    (
        ["privacy=none", "user_privacy=dpfedavg", "user_privacy.delta=1e-300"],
        "user_privacy.delta=1e-300: the pld accountant gives epsilon = inf",
    ),
    ("fashion", "train-images-idx3-ubyte.gz cannot be read"),
    (["audit=one_run", "user_privacy=dpfedavg", "audit.canary=input"], "user-level DP is audited with canary clients"),
    (
        ["audit=one_run", "user_privacy=dpfedavg", "secure_aggregation=on"],
        "audit.method='one_run': canary clients hold no secure-aggregation masks",
    ),
    (
        ["audit=one_run", "user_privacy=dpftrl", "client.sampling=epoch", "client.fraction=0.5"],
        "canary clients are Poisson-sampled, not once an epoch",
    ),
    (["audit=one_run", f"trainer.ckpt_path={__file__}"], "cannot resume: drop trainer.ckpt_path"),
    (["audit=one_run", "hardware=multi_cpu"], "each process would draw its own canaries"),
    (["audit=one_run", "audit.client=carol"], "audit.client='carol': no such client; choose one of"),
    (["audit=one_run", "audit.canary=input", "audit.client=carol"], "audit.client='carol': no such client"),
    (
        ["audit=one_run", "client.runtime=syft"],
        "audit.canary='dirac': Dirac canaries join the steps inside",
    ),
    (["audit=one_run", "audit.canaries=100000"], "audit.canaries=100000: Dirac canaries need a coordinate each"),
    (["model.lr=-1"], "model.lr=-1: must be a number > 0"),
    (["model.lr=abc"], "model.lr='abc': must be a number > 0"),
    (["+model.momentum=-1"], "model.momentum=-1: must be a number in [0, 1)"),
    (["model._target_=no.such.Module"], "model._target_='no.such.Module': Error locating target 'no.such.Module'"),
    (["data.features=scatternet"], "data.features=scatternet: the model cannot read 81x7x7 ScatterNet features"),
]


@pytest.mark.parametrize(("overrides", "names"), LOADED, ids=[" ".join(o) if o != "fashion" else o for o, _ in LOADED])
def test_a_refusal_found_after_loading_is_one_line_with_exit_2(capsys, tmp_path, monkeypatch, overrides, names):
    if overrides == "fashion":
        overrides = fake_fashion_mnist(tmp_path, monkeypatch)
    conf = cli.compose_overrides([*FAST, *overrides])
    line = one_error_line(capsys, lambda: cli.main(conf, run_dir=tmp_path / "run"))
    assert names in line, line
    assert not (tmp_path / "run" / "results.json").exists() and not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(
    "overrides",
    [
        ["privacy=none", "privacy.noise_multiplier=0"],
        ["client.count=1", "client.names=[solo]"],
        ["privacy.delta=1e-9"],
        ["privacy=seed_classic"],
        ["privacy.secure_mode=true"],
        ["+model.momentum=0.5"],
        ["-m", "privacy.noise_multiplier=0.5,1.0"],
    ],
)
def test_valid_edge_values_are_accepted(capsys, overrides):
    cli.check_overrides(overrides)  # no SystemExit
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        (["+privacy.noise_multipler=1"], "privacy.noise_multipler (did you mean privacy.noise_multiplier?)"),
        (["data.synthetic_train_size=300", "privacy.delta=0.01"], "privacy.delta=0.01 is not below 1/n = 1/150"),
    ],
)
def test_the_real_train_py_process_keeps_the_contract(tmp_path, overrides, names):
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *FAST, *overrides, f"hydra.run.dir={tmp_path}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and lines[-1].startswith("error: ") and names in lines[-1], result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "results.json").exists()
