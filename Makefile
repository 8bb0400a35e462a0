# Each target creates .venv/ and installs the project into it when missing.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
BASE_STAMP := $(VENV)/.base-stamp
ARGS ?=

SYFT_VENV ?= .venv-syft
SYFT_PY := $(SYFT_VENV)/bin/python
SYFT_STAMP := $(SYFT_VENV)/.installed-stamp

.PHONY: train test syft-test docs tb-screenshots bench bench-gpu bench-quick privacy-utility lint

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

$(BASE_STAMP): pyproject.toml  # the package alone: what training needs
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -e .
	touch $(BASE_STAMP)

train: $(BASE_STAMP)  ## the seed workload; extra Hydra overrides with ARGS="privacy.noise_multiplier=0.8 ..."
	$(PY) train.py $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q

$(SYFT_STAMP): pyproject.toml
	test -x $(SYFT_PY) || python3 -m venv $(SYFT_VENV)
	$(SYFT_PY) -m pip install -q -e ".[syft]" "pytest>=8"
	touch $(SYFT_STAMP)

syft-test: $(SYFT_STAMP)  ## clients as PySyft datasites, in their own venv (syft 0.9.5 pins numpy 1.24.4)
	$(SYFT_PY) -m pytest -q -p no:cacheprovider tests/runtime/test_syft_runtime.py

DOCS_STAMP := $(VENV)/.docs-stamp
$(DOCS_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[docs]"
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)  ## the documentation site (docs/ -> site/), warnings are errors
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

tb-screenshots: $(STAMP)  ## docs/images/tensorboard-*.png from two short runs, rendered in headless Chromium
	$(PY) docs/tensorboard_screenshots.py

bench: $(STAMP)
	$(PY) benchmarks/seed_round.py
	$(PY) benchmarks/speed.py --compile
	$(PY) benchmarks/scale_clients.py
	$(PY) benchmarks/scenarios.py
	$(PY) benchmarks/user_level.py
	$(PY) benchmarks/user_level.py --adaptive --clip 0.3 --out benchmarks/results/user_level_adaptive.json
	$(PY) benchmarks/secure_aggregation.py
	$(PY) benchmarks/grad_sample_modes.py
	$(PY) benchmarks/frameworks.py
	$(PY) benchmarks/audit.py

# the privacy-utility curve on Fashion-MNIST, 2 IID clients, the model and settings of the 84 % target (about 45
# minutes on 2 CPU cores); the table and picture go to benchmarks/results/privacy_utility_fashion_mnist/
CURVE_DIR ?= multirun/privacy_utility
CURVE := data=fashion_mnist model=scatternet privacy.max_grad_norm=0.1 trainer.rounds=40 trainer.batch_size=2048 trainer.progress_bar=false
privacy-utility: $(STAMP)
	$(PY) train.py -m $(CURVE) privacy=target privacy.target_epsilon=0.5,1,2,4,8 hydra.sweep.dir=$(CURVE_DIR)
	$(PY) train.py $(CURVE) privacy=none model.lr=0.1 hydra.run.dir=$(CURVE_DIR)/no_dp  # lr 4 diverges unclipped
	$(PY) -m fl_dp_lightning.plot $(CURVE_DIR) --out benchmarks/results/privacy_utility_fashion_mnist

bench-gpu: $(STAMP)  ## the speed benchmark on the first CUDA device
	$(PY) benchmarks/speed.py --device cuda --compile --out benchmarks/results/speed_cuda.json

bench-quick: $(STAMP)  ## every benchmark on small synthetic data: checks they run (the tests run these too)
	$(PY) benchmarks/seed_round.py --quick --rounds 1 --out /tmp/fl_dp_bench/seed_round.json
	$(PY) benchmarks/speed.py --quick --out /tmp/fl_dp_bench/speed.json
	$(PY) benchmarks/scale_clients.py --clients 2 10 --rounds 1 --processes 1 --out /tmp/fl_dp_bench/scale_clients.json
	$(PY) benchmarks/scenarios.py --quick --out /tmp/fl_dp_bench/scenarios.json
	$(PY) benchmarks/user_level.py --quick --out /tmp/fl_dp_bench/user_level.json
	$(PY) benchmarks/secure_aggregation.py --quick --out /tmp/fl_dp_bench/secure_aggregation.json
	$(PY) benchmarks/grad_sample_modes.py --quick --out /tmp/fl_dp_bench/grad_sample_modes.json
	$(PY) benchmarks/frameworks.py --quick --out /tmp/fl_dp_bench/frameworks.json
	$(PY) benchmarks/audit.py --quick --out /tmp/fl_dp_bench/audit.json

lint: $(STAMP)
	$(VENV)/bin/ruff check fl_dp_lightning tests benchmarks examples train.py
	$(VENV)/bin/ruff format --check fl_dp_lightning tests benchmarks examples train.py
