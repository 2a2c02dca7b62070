# amalgam: the habits of the project. `make help` lists them.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA_DIR ?= data
TEACHERS_DIR ?= teachers
export HF_HUB_OFFLINE ?= 1

.PHONY: help install test test-fast test-long test-soak lint format clean demo teachers data data-mnist bench \
	bench-accuracy bench-accuracy-mf4 mnist-fashion4 teachers-mf4 teachers-lite0 bench-pretrained \
	teachers-overlap2

help:
	@echo "make install  - create $(VENV) and install amalgam[dev] (idempotent)"
	@echo "make demo     - get Fashion-MNIST, train two teachers, amalgamate, print the table"
	@echo "make test     - the whole test suite (slow tests included, the soak test not)"
	@echo "make test-fast - the tests not marked slow"
	@echo "make test-long - over the make-test budget: variants of tested paths, the 224 px end-to-end run (about 5 min)"
	@echo "make test-soak - a long CPU run: memory stays flat over thousands of steps (minutes)"
	@echo "make bench    - time teachers / student / full step / cached step on the demo models"
	@echo "make bench-accuracy - the fashion2 evidence table: scratch/kd/cfl/ablations x 3 seeds (1 h 31 min on 2 cores, bf16)"
	@echo "make teachers-mf4 - train the four mnist_fashion4 teachers if missing (about 40 min on 2 cores)"
	@echo "make mnist-fashion4 - the 4-teacher, 20-class benchmark (MNIST + Fashion-MNIST)"
	@echo "make bench-accuracy-mf4 - the mnist_fashion4 evidence table: 5 methods x 3 seeds (12 jobs measured: 1 h 39 min on 2 cores, bf16; all 15 about 2 h 5 min, estimated; + 40 min of teachers)"
	@echo "make lint / make format / make clean"

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1" || \
		$(BIN)/python -m pip install --quiet torch torchvision
	$(BIN)/python -m pip install --quiet -e ".[dev,hparams]"
	touch $(STAMP)

install: $(STAMP)

test: install
	$(BIN)/python -m pytest -q -m "not soak and not long"

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow and not soak and not long"

test-long: install
	$(BIN)/python -m pytest -q -m long

test-soak: install
	$(BIN)/python -m pytest -q -s -m soak tests/test_reliability.py

lint: install
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

format: install
	$(BIN)/ruff format src tests
	$(BIN)/ruff check --fix src tests

data: install
	$(BIN)/python -m amalgam.data.fetch fashion_mnist --root $(DATA_DIR)

TEACHERS ?= demo_a demo_b
RECIPE ?= demo_teachers
teachers: install data
	@for t in $(TEACHERS); do \
		if [ -f $(TEACHERS_DIR)/$$t.safetensors ] && [ -f $(TEACHERS_DIR)/$$t.json ]; then \
			echo "teacher $$t exists: $(TEACHERS_DIR)/$$t.safetensors (delete it to retrain)"; \
		else \
			$(BIN)/python -m amalgam.train_teacher experiment=$(RECIPE) teacher=$$t || exit 1; \
		fi; \
	done

data-mnist: install
	$(BIN)/python -m amalgam.data.fetch mnist --root $(DATA_DIR)

# the mnist_fashion4 benchmark: 4 teachers (3 families) over MNIST + Fashion-MNIST, 20 classes
MF4_TEACHERS := mf_a mf_b mf_c mf_d
# `teachers` with this list and recipe (target-specific variables reach its prerequisites)
teachers-mf4: TEACHERS = $(MF4_TEACHERS)
teachers-mf4: RECIPE = mnist_fashion4_teachers
teachers-mf4: data-mnist teachers

# the data sets are fetched once, by the sub-make inside the timer (teachers-mf4; demo: teachers)
mnist-fashion4: install
	@start=$$(date +%s); \
	$(MAKE) --no-print-directory teachers-mf4 || exit 1; \
	$(BIN)/python -m amalgam.amalgamate experiment=mnist_fashion4 || exit 1; \
	echo "mnist_fashion4 wall time: $$(( $$(date +%s) - start )) s"

demo: install
	@start=$$(date +%s); \
	$(MAKE) --no-print-directory teachers || exit 1; \
	$(BIN)/python -m amalgam.amalgamate experiment=demo || exit 1; \
	echo "demo wall time: $$(( $$(date +%s) - start )) s"

bench: teachers
	$(BIN)/python -m amalgam.bench experiment=demo bench.write=docs/PERFORMANCE.md

# the fashion2 evidence table (docs/RESULTS.md): 5 methods x 3 seeds, density_ratio targets, cached
bench-accuracy: teachers
	@start=$$(date +%s); \
	$(BIN)/python -m amalgam.amalgamate experiment=fashion2 sweep=evidence || exit 1; \
	echo "bench-accuracy wall time: $$(( $$(date +%s) - start )) s"

# the overlap benchmark: two Fashion-MNIST teachers sharing two classes (0-5 and 4-9)
teachers-overlap2: TEACHERS = overlap_a overlap_b
teachers-overlap2: teachers

# the pretrained regime on the CPU (docs/RESULTS.md): ImageNet EfficientNet-Lite0 teachers and
# students on fashion2 at 64 px, ImageNet init vs random init, KD vs CFL, 3 seeds
LITE0_TEACHERS := lite0_fa lite0_fb
teachers-lite0: TEACHERS = $(LITE0_TEACHERS)
teachers-lite0: RECIPE = lite0_fashion2_teachers
teachers-lite0: teachers

bench-pretrained: install
	@start=$$(date +%s); \
	$(MAKE) --no-print-directory teachers-lite0 || exit 1; \
	$(BIN)/python -m amalgam.amalgamate experiment=lite0_fashion2 sweep=pretrained || exit 1; \
	echo "bench-pretrained wall time: $$(( $$(date +%s) - start )) s"

# the mnist_fashion4 evidence table (docs/RESULTS.md): 5 methods x 3 seeds, each method at its
# recipe chosen on the validation split (conf/tuned/mnist_fashion4/); teachers trained if missing
bench-accuracy-mf4: install
	@start=$$(date +%s); \
	$(MAKE) --no-print-directory teachers-mf4 || exit 1; \
	$(BIN)/python -m amalgam.amalgamate experiment=mnist_fashion4 sweep=evidence || exit 1; \
	echo "bench-accuracy-mf4 wall time: $$(( $$(date +%s) - start )) s"

clean:
	rm -rf .pytest_cache .ruff_cache build dist src/*.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
	@echo "kept $(VENV), $(DATA_DIR), $(TEACHERS_DIR) and logs/ (remove them by hand if wanted)"
