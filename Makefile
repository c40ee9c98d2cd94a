# The two commands of the README: `make repro` and `make test`. Both create .venv when needed.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export PYTHONHASHSEED := 0

.PHONY: repro test test-fast params install clean-runs

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

repro: $(STAMP)
	test -d .dvc || $(BIN)/dvc init --quiet
	$(BIN)/dvc config --local hydra.enabled true
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro
	@echo; echo "== cell and smear results (reports/report.md; all metrics: .venv/bin/dvc metrics show) =="
	@sed -n '/^## 2/,/^!\[smear ROC\]/p' reports/report.md

test: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q

test-fast: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q -m "not slow"

params: $(STAMP)
	$(BIN)/python -m smearnet.cli compose-params

# CI retraining (.github/workflows/retrain.yml, deploy/README.md): dvc pull, optionally a new site
# (SITE=<name> SITE_DIR=<folder>), dvc repro (the register stage is the promotion gate), dvc push, and the
# metrics/params/plots diff against BASE plus the gate decision into $GITHUB_STEP_SUMMARY (else stdout).
.PHONY: retrain
retrain: $(STAMP)
	test -d .dvc || $(BIN)/dvc init --quiet
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/smearnet retrain --base "$(or $(BASE),main)" \
		$(if $(SITE_DIR),--site-folder "$(SITE_DIR)" --site "$(SITE)")
