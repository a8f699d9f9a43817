# PF-SR set-up. `make demo` and `make test` install what they need first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Without a GPU pin the CPU build of torch; with one, pip takes the default (CUDA) build.
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
CONSTRAINTS := $(if $(HAS_GPU),,-c constraints/cpu.txt)
# Where the CPU build comes from when PyPI's default torch would be the CUDA one:
#   make install TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
TORCH_CPU_INDEX ?=
CPU_INDEX := $(if $(HAS_GPU),,$(if $(TORCH_CPU_INDEX),--extra-index-url $(TORCH_CPU_INDEX),))
DATA ?=

.PHONY: install test demo bench docs clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints/cpu.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(CONSTRAINTS) $(CPU_INDEX) -e ".[dev]"
	# lpips only for its released linear-layer weights: its metadata requires torchvision, which is never installed here.
	$(BIN)/python -m pip install -q --no-deps lpips==0.1.4
	touch $@

# The web page's browser test drives Debian's chromium through chromium-driver (/usr/bin/chromedriver); without
# them (no apt-get, not root) it is skipped and says why.
test: install
	@if [ ! -x /usr/bin/chromedriver ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get install -y -q chromium chromium-driver || (apt-get update -q && apt-get install -y -q chromium chromium-driver) \
		|| echo "chromium-driver could not be installed: tests/test_web_page.py will be skipped"; fi
	$(BIN)/python -m pytest

demo: install
	$(BIN)/pfsr demo $(if $(DATA),--data $(DATA),)

bench: install
	$(BIN)/python bench/run_all.py

# README sections generated from code: the configuration reference and the benchmark table (from bench/results).
docs: install
	$(BIN)/python scripts/gen_config_reference.py
	$(BIN)/python bench/run_all.py --table-only

clean:
	rm -rf $(VENV) demo_out
