# Documented entry points. Each target installs what it needs into .venv, so a fresh clone works.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

# `make train`: synthetic CT-like data, then the 3D bundle through the user's own command, sized for a CPU.
TRAIN_DATA ?= data/synthetic3d
TRAIN_OUT ?= runs/make_train_3d
TRAIN_CASES ?= 16
# lesions are a few voxels wide: keep 1.2 mm in-plane and centre 3 of 5 patches on them
TRAIN_OVERRIDES ?= --spacing "[1.2,1.2,2.5]" --patch_size "[64,64,32]" --channels "[16,32,64,128]" \
	--strides "[2,2,2]" --patch_class_ratios "[1,1,3]" --max_epochs 100 --val_interval 10 --warmup_epochs 3 \
	--learning_rate 0.003 --num_workers 2 --num_folds 4 --log_every_iteration False

.PHONY: install test train lint clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: install lint
	$(PY) -m pytest -q

train: install
	$(PY) -m custom_components.synthetic --out $(TRAIN_DATA) --cases $(TRAIN_CASES) --seed 0
	$(PY) -m monai.bundle run training --config_file bundles/unet3d/configs/train.yaml \
		--meta_file bundles/unet3d/configs/metadata.json --logging_file bundles/unet3d/configs/logging.conf \
		--dataset_dir $(TRAIN_DATA) --output_dir $(TRAIN_OUT) $(TRAIN_OVERRIDES)
	@echo "metrics: $(TRAIN_OUT)/metrics.json  curve: $(TRAIN_OUT)/learning_curve.png"

lint: install  # ruff is part of the tests: CI fails on lint
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) runs data
