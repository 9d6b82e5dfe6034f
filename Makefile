# Documented entry points. Each target installs what it needs into .venv, so a fresh clone works.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

# `make train`: synthetic CT-like data, then the 3D bundle through the user's own command on its defaults: `plan: auto`
# fits spacing, intensity, class weights, network, patch, batch and epoch length to the data and this machine. Only
# the data, the run folder and a wall-clock budget are given; the budget keeps `make train` within the time its
# hand-tuned recipe took (benchmarks/RESULTS.md)
TRAIN_DATA ?= data/synthetic3d
TRAIN_OUT ?= runs/make_train_3d
TRAIN_CASES ?= 20
TRAIN_MINUTES ?= 1.2
# more bundle keys for `make train`, e.g. TRAIN_EXTRA="--seed 1"
TRAIN_EXTRA ?=

.PHONY: install test train render compare cv bench lint clean

# the report test opens report.html in Debian's chromium (driven by playwright): installed here when root can
CHROMIUM ?= /usr/bin/chromium

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	@test -x $(CHROMIUM) || { test "$$(id -u)" = 0 && apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } \
		|| echo "install Debian's chromium (apt-get install chromium) for the report.html browser test"
	touch $(STAMP)

install: $(STAMP)

# two pytest workers, one test file each at a time (files share their fixtures), the slowest files first
# (tests/conftest.py SLOW_FILES)
test: install lint
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

train: install
	$(PY) -m custom_components.synthetic --out $(TRAIN_DATA) --cases $(TRAIN_CASES) --seed 0
	$(PY) -m monai.bundle run training --config_file bundles/unet3d/configs/train.yaml \
		--meta_file bundles/unet3d/configs/metadata.json --logging_file bundles/unet3d/configs/logging.conf \
		--dataset_dir $(TRAIN_DATA) --output_dir $(TRAIN_OUT) --time_budget_min $(TRAIN_MINUTES) $(TRAIN_EXTRA)
	@echo "run bundle: $(TRAIN_OUT) (models/model.pt, configs/inference.yaml)  metrics: $(TRAIN_OUT)/metrics.json  curve: $(TRAIN_OUT)/learning_curve.png"

# the bundles' configs from their one template (bundles/template): run after editing it; `make test` checks it
render: install
	$(PY) -m custom_components.render

# 2D vs 3D on the same synthetic data and budget: runs/compare_2d_3d/comparison.{md,png}
compare: install
	$(PY) benchmarks/compare_2d_3d.py --output runs/compare_2d_3d

# 5-fold cross-validation of the 3D bundle on the `make train` data, each fold on the bundle's defaults (one plan for
# all folds) and `make train`'s budget: runs/make_cv_3d/report.md
CV_OUT ?= runs/make_cv_3d
cv: install
	$(PY) -m custom_components.synthetic --out $(TRAIN_DATA) --cases $(TRAIN_CASES) --seed 0
	$(PY) -m custom_components.kfold run --bundle bundles/unet3d --dataset_dir $(TRAIN_DATA) --folds 5 \
		--output $(CV_OUT) --set time_budget_min=$(TRAIN_MINUTES)

# norms at batch 1/2/8 and skip connections on synthetic data (about 10 min on 2 CPU cores)
bench: install
	$(PY) benchmarks/norms_and_skips.py --out runs/bench_norms_and_skips

# seconds per iteration with and without the data pipeline, per-epoch overhead, FLOP/s against the CPU's conv peak
# (runs/bench_throughput/throughput.md; `--quick` took 6 min on 2 busy CPU cores, the default runs longer)
.PHONY: bench-throughput
bench-throughput: install
	$(PY) benchmarks/throughput.py --out runs/bench_throughput

# validation Dice after 1, 2, 5 and 10 minutes of training for the default bundles and the plans, on thin-slab
# synthetic data, the plans also compiled (runs/bench_dice_per_minute/dice_per_minute.{md,png}; about 2 h on 2 CPU cores)
.PHONY: bench-dice-per-minute
bench-dice-per-minute: install
	$(PY) benchmarks/dice_per_minute.py --out runs/bench_dice_per_minute

# `make train`'s recipe and variants of it over seeds 0, 1, 2 (each seed its own split, weights and draws): the
# spread a recipe change must beat (runs/bench_make_train_seeds/make_train_seeds.md; about 1 h on 2 CPU cores)
.PHONY: bench-make-train-seeds
bench-make-train-seeds: install
	$(PY) benchmarks/make_train_seeds.py --out runs/bench_make_train_seeds

lint: install  # ruff is part of the tests: CI fails on lint
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q -p no:cacheprovider tests/test_imports.py  # no import cycle (function-level imports included)

clean:
	rm -rf $(VENV) runs data
