# Every target sets itself up: a virtualenv with the project's dependencies is built once under
# ~/.cache (keyed by a hash of setup.py, the lock and the torch pins) and shared by every clone; the
# code always runs from the clone itself (PYTHONPATH), so a shared venv never tests another clone's code.
#
# `make test`, `make demo` and `make bench` run in the locked environment: constraints.txt pins every
# package of the venv. `make test-latest` runs the same suite on the newest versions setup.py allows
# (a venv built afresh each day); `make lock` then writes that venv's versions into constraints.txt.

PYTHON ?= python3
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
LOCK := constraints.txt
VENV_KEY := $(shell (cat setup.py $(LOCK); echo '$(TORCH_PINS)') | sha256sum | cut -c1-16)
VENV_ROOT ?= $(HOME)/.cache/lime-moe
VENV := $(VENV_ROOT)/venv-$(VENV_KEY)
VENV_PY := $(VENV)/bin/python
RUN := PYTHONPATH=$(CURDIR) $(VENV_PY)
LATEST_VENV := $(VENV_ROOT)/latest-$(shell date +%Y%m%d)-$(shell (cat setup.py; echo '$(TORCH_PINS)') | sha256sum | cut -c1-8)
LATEST_PY := $(LATEST_VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: venv latest-venv test test-latest test-slow test-all demo bench host-gap lock clean-venv

# A venv is built under a lock and marked complete last, so parallel runs (CI beside a developer)
# never see a half-installed one; the project itself is uninstalled again so that only its
# dependencies stay in the shared venv. $(1): the venv, $(2): pip's constraint option (or nothing).
define build_venv
	@mkdir -p $(VENV_ROOT)
	flock $(1).lock sh -ec '\
	  if [ -f $(1)/.complete ]; then exit 0; fi; \
	  rm -rf $(1); \
	  $(PYTHON) -m venv $(1); \
	  $(1)/bin/python -m pip install --quiet $(2) --upgrade pip setuptools wheel; \
	  $(1)/bin/python -m pip install --quiet $(2) $(TORCH_PINS); \
	  $(1)/bin/python -m pip install --quiet $(2) ".[test,video]"; \
	  $(1)/bin/python -m pip uninstall --quiet --yes lime-moe; \
	  touch $(1)/.complete'
endef

# The suite on the interpreter $(1). The C++ CPU operators are built first (a build error stops the run
# here, with the compiler's message, rather than as skipped tests). The fused kernels are checked twice
# without a GPU: compiled for sm_80/sm_90 (compile_check), and run against the reference under Triton's
# CPU interpreter.
define run_suite
	PYTHONPATH=$(CURDIR) $(1) -m lime_kernels.cpu
	PYTHONPATH=$(CURDIR) $(1) -m lime_kernels.compile_check
	PYTHONPATH=$(CURDIR) $(1) -m pytest -q -m "not slow" $(PYTEST_ARGS) --ignore=tests/test_fused.py --ignore=tests/test_fused_conv1d.py tests
	TRITON_INTERPRET=1 PYTHONPATH=$(CURDIR) $(1) -m pytest -q -m "not slow" $(PYTEST_ARGS) tests/test_fused.py tests/test_fused_conv1d.py
endef

$(VENV)/.complete:
	$(call build_venv,$(VENV),-c $(CURDIR)/$(LOCK))
	@# Environments that no run has used for a week are removed (5.5 GB each).
	find $(VENV_ROOT) -maxdepth 1 \( -name 'venv-*' -o -name 'latest-*' \) -type d ! -name 'venv-$(VENV_KEY)' -mtime +7 -exec rm -rf {} +

$(LATEST_VENV)/.complete:
	$(call build_venv,$(LATEST_VENV),)

venv: $(VENV)/.complete
	@touch $(VENV)
	@$(VENV_PY) tools/lock.py check

latest-venv: $(LATEST_VENV)/.complete
	@touch $(LATEST_VENV)

test: venv
	$(call run_suite,$(VENV_PY))

# The newest versions setup.py allows today: what a user's fresh `pip install` gets.
test-latest: latest-venv
	$(LATEST_PY) -m pip list --format=freeze | grep -iE '^(torch|transformers|accelerate|datasets|peft|bitsandbytes|triton)=='
	$(call run_suite,$(LATEST_PY))

# Refresh the lock from today's newest versions (after `make test-latest` passes); commit constraints.txt.
lock: latest-venv
	$(LATEST_PY) tools/lock.py write

test-slow: venv
	$(RUN) -m pytest -q -m slow $(PYTEST_ARGS) --ignore=tests/test_fused.py --ignore=tests/test_fused_conv1d.py tests

test-all: test test-slow

demo: venv
	$(RUN) -m lime demo --out demo-output

# The benchmarks: on a CPU-only machine the quick sweep; BENCH_ARGS overrides (e.g. "--device cuda").
# Then the cost model (modelled H100 ratios from the accounted launches) and the host overhead per step.
BENCH_ARGS ?= --quick --device cpu
bench: venv
	$(RUN) benchmarks/run.py $(BENCH_ARGS) --out benchmark-results
	$(RUN) -m benchmarks.cost_model --out benchmark-results

# Where LiME's host time goes on small layers, on the CPU (the README's "Where the host decides"): minutes.
host-gap: venv
	$(RUN) -m benchmarks.host_gap --out benchmark-results

clean-venv:
	rm -rf $(VENV)
