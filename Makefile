# Every target sets itself up: a virtualenv with the project's dependencies is built once under
# ~/.cache (keyed by a hash of setup.py and the torch pins) and shared by every clone; the code
# always runs from the clone itself (PYTHONPATH), so a shared venv never tests another clone's code.

PYTHON ?= python3
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
VENV_KEY := $(shell (cat setup.py; echo '$(TORCH_PINS)') | sha256sum | cut -c1-16)
VENV_ROOT ?= $(HOME)/.cache/lime-moe
VENV := $(VENV_ROOT)/venv-$(VENV_KEY)
VENV_PY := $(VENV)/bin/python
RUN := PYTHONPATH=$(CURDIR) $(VENV_PY)
PYTEST_ARGS ?=

.PHONY: venv test test-slow test-all demo bench clean-venv

# The venv is built under a lock and marked complete last, so parallel runs (CI beside a
# developer) never see a half-installed one; the project itself is uninstalled again so that
# only its dependencies stay in the shared venv.
$(VENV)/.complete:
	@mkdir -p $(VENV_ROOT)
	flock $(VENV).lock sh -ec '\
	  if [ -f $(VENV)/.complete ]; then exit 0; fi; \
	  rm -rf $(VENV); \
	  $(PYTHON) -m venv $(VENV); \
	  $(VENV_PY) -m pip install --quiet --upgrade pip setuptools wheel; \
	  $(VENV_PY) -m pip install --quiet $(TORCH_PINS); \
	  $(VENV_PY) -m pip install --quiet ".[test,video]"; \
	  $(VENV_PY) -m pip uninstall --quiet --yes lime-moe; \
	  touch $(VENV)/.complete'
	@# Environments of older requirements that no run has used for a week are removed (5.5 GB each).
	find $(VENV_ROOT) -maxdepth 1 -name 'venv-*' -type d ! -name 'venv-$(VENV_KEY)' -mtime +7 -exec rm -rf {} +

venv: $(VENV)/.complete
	@touch $(VENV)

# The fused kernels are checked twice without a GPU: compiled for sm_80/sm_90 (compile_check),
# and run against the reference under Triton's CPU interpreter (float32).
test: venv
	$(RUN) -m lime_kernels.compile_check
	$(RUN) -m pytest -q -m "not slow" $(PYTEST_ARGS) --ignore=tests/test_fused.py --ignore=tests/test_fused_conv1d.py tests
	TRITON_INTERPRET=1 $(RUN) -m pytest -q -m "not slow" $(PYTEST_ARGS) tests/test_fused.py tests/test_fused_conv1d.py

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

clean-venv:
	rm -rf $(VENV)
