# The two commands of the README:  `make demo`  and  `make test`.
# Both create .venv (if missing) and install the pinned environment first.

PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch goes in first, so that installing monai never pulls another build. Default (CPU route): the CPU wheel from
# the PyTorch CPU index; on Linux a plain `pip install torch` would fetch the CUDA build plus ~16 NVIDIA packages
# (several GB). If that index cannot be reached, setup says so and falls back to the default index (on Linux: the
# CUDA build; a machine with a local wheel of torch, found through pip's find-links, gets that wheel).
# GPU route: make setup TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"
TORCH_VERSION   ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_SPEC      ?=
STAMP  := $(VENV)/.isl-installed
# The course extra (Jupyter Book 1, Playwright): the book and the real-browser test; `make test` installs it too.
COURSE_STAMP := $(VENV)/.isl-course-installed
PROFILE ?= quick
DEMO_DATA ?= data/synthetic
DEMO_OUT  ?= outputs/demo

.PHONY: setup demo experiment test lint lab clean-venv gpu-wheels book student

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@if [ -n "$(TORCH_SPEC)" ]; then \
		echo "torch: $(TORCH_SPEC) (TORCH_SPEC)"; $(BIN)/python -m pip install --quiet $(TORCH_SPEC); \
	elif [ "$$(uname -s)" != Linux ]; then \
		echo "torch: torch==$(TORCH_VERSION) from the default index (its $$(uname -s) wheel has no CUDA)"; \
		$(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION); \
	elif $(BIN)/python -m pip install --quiet --timeout 20 --retries 1 torch==$(TORCH_VERSION) \
			--index-url $(TORCH_CPU_INDEX); then \
		echo "torch: CPU build of torch==$(TORCH_VERSION) ($(TORCH_CPU_INDEX))"; \
	else \
		echo "note: $(TORCH_CPU_INDEX) could not be reached; installing torch==$(TORCH_VERSION) from the default"; \
		echo "      index instead. Without a local CPU wheel that is the CUDA build (several GB); for the CPU build,"; \
		echo "      rerun when the index is reachable, or set TORCH_SPEC to a wheel file or another index."; \
		$(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION); \
	fi
	@$(BIN)/python -c "import torch; print('torch', torch.__version__, 'CUDA ' + torch.version.cuda if torch.version.cuda else '(CPU build)')"
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

test: $(STAMP) $(COURSE_STAMP)
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

# ---------------------------------------------------------------------------------------------- course material
# The book: the notebooks executed by `isl reproduce` (BOOK_PROFILE: quick is what an instructor publishes; CI
# checks the build on stand-in notebooks), then a static Jupyter Book 1 site at outputs/book/html/index.html.
# Student copies: every cell tagged `solution` replaced by a stub, outputs stripped, in outputs/student.
BOOK_PROFILE ?= quick
BOOK_RUN     ?= outputs/book/run

$(COURSE_STAMP): $(STAMP) pyproject.toml constraints.txt
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[course]"
	touch $(COURSE_STAMP)

book: $(COURSE_STAMP)
	$(BIN)/isl reproduce --profile $(BOOK_PROFILE) --out $(BOOK_RUN)
	$(BIN)/python -m isl_core.course book --run $(BOOK_RUN) --out outputs/book

student: $(STAMP)
	$(BIN)/python -m isl_core.course student --out outputs/student
