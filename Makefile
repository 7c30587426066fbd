# Two entry points (README): `make demo` and `make test`. Both create .venv first, idempotently.
PY      ?= python3.11
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-$(shell cat requirements.txt pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: venv demo test test-fast clean-venv

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	bash scripts/setup_env.sh $(PY) $(VENV)
	rm -f $(VENV)/.installed-*
	touch $@

demo: venv
	$(VPY) -m tools.demo

test: venv
	$(VPY) -m pytest -n 2 --dist loadgroup

test-fast: venv
	$(VPY) -m pytest -m "not multiproc and not ray and not vllm and not slow"

clean-venv:
	rm -rf $(VENV)
