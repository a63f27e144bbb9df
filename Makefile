# The two commands of the README:  `make demo`  and  `make test`.
# Both create .venv (if missing) and install the pinned environment first.

PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU wheel of torch goes in first, so that installing monai never pulls a multi-GB CUDA build.
# On a GPU machine: make demo TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.isl-installed
PROFILE ?= quick
DEMO_DATA ?= data/synthetic
DEMO_OUT  ?= outputs/demo

.PHONY: setup demo experiment test lint lab clean-venv gpu-wheels

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[notebooks,test]"
	$(BIN)/python -m ipykernel install --sys-prefix --name isl-kit --display-name "isl-kit (.venv)" >/dev/null
	touch $(STAMP)

# The main job: the synthetic cohort, then the numbered notebooks executed headless (they train the baseline,
# walk through the three stages on one case and run every method on every shifted inference case).
# Rerunning resumes: the baseline and finished cases are kept.
demo: $(STAMP)
	$(BIN)/isl data synth $(DEMO_DATA)
	$(BIN)/isl reproduce --profile $(PROFILE) --data $(DEMO_DATA) --out $(DEMO_OUT)
	@echo "notebooks: $(DEMO_OUT)/index.md"
	@echo "report:    $(DEMO_OUT)/work/experiment/report.md"

# The cohort experiment alone (no notebooks): the five default methods, results in outputs/experiment.
experiment: $(STAMP)
	$(BIN)/isl data synth $(DEMO_DATA)
	$(BIN)/isl experiment $(DEMO_DATA) --out outputs/experiment --profile $(PROFILE)
	@echo "report: outputs/experiment/report.md"

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest

lab: $(STAMP)
	$(BIN)/jupyter lab notebooks

clean-venv:
	rm -rf $(VENV)

# Wheels a GPU machine without a package index needs for bench/gpu_run.sh (its image has torch, numpy, scipy).
# Both are pure-Python wheels: any pip can fetch them, no .venv needed.
gpu-wheels:
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: -d bench/wheels \
		$$(grep -E '^(monai|nibabel)==' constraints.txt)
