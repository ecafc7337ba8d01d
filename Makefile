# rekey: `make demo` and `make test` are the two commands a fresh clone needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv demo test lint bench soak acceptance constraints stress-smoke stress-compare

venv: $(STAMP)

# Idempotent: re-installs only when pyproject.toml or the constraints change.
$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "rekey needs Python >= 3.11")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

demo: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/demo.sh

test: venv
	$(BIN)/python -m pytest

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/bandit -q -c pyproject.toml -r .

bench: venv
	$(BIN)/python -m loadtest.bench_sealing
	$(BIN)/python -m loadtest.bench_attestation
	$(BIN)/python -m loadtest.bench_evidence
	$(BIN)/python -m loadtest.bench_throttle
	$(BIN)/python -m loadtest.bench_rotation
	$(BIN)/python -m loadtest.bench_rotation_quota
	$(BIN)/python -m loadtest.bench_stress_generator
	$(BIN)/python -m loadtest.bench_migration --kind both

soak: venv
	$(BIN)/python -m pytest -m soak

# The generation migration's acceptance test at full size (5,000 blobs on 4 sim hosts); also in `make soak`.
acceptance: venv
	$(BIN)/python -m pytest -m soak -s tests/integration/test_migration_acceptance.py

# The stress harness end to end (not part of `make test`): 60 s on the local Managed HSM profile,
# 200 ops/s offered against its limit of 150/s, a rotation of 300 blobs every 15 s, then the report.
stress-smoke: venv
	$(BIN)/python -m rekey.cli stress run --profile managed-hsm --throttle-rate 150 --rate 200 \
		--duration 60s --rotate-every 15s --blobs 300 --label smoke --force --out stress-smoke/run
	$(BIN)/python -m rekey.cli stress report stress-smoke/run --out stress-smoke/report.html

# The three retry strategies on each throttled local backend (150 ops/s offered against a limit of
# 100/s, 60 s each, about 12 minutes), then one report of all nine runs side by side.
STRESS_PROFILES ?= vault-quota aws-kms managed-hsm
STRESS_STRATEGIES ?= governor sdk-default naive
stress-compare: venv
	set -e; for p in $(STRESS_PROFILES); do for s in $(STRESS_STRATEGIES); do \
		$(BIN)/python -m rekey.cli stress run --profile $$p --throttle-rate 100 --rate 150 --duration 60s \
			--strategy $$s --label "$$s / $$p" --force --out stress-compare/$$p-$$s; \
	done; done
	$(BIN)/python -m rekey.cli stress report stress-compare/*/ --out stress-compare/report.html

# Refresh the constraints file from the current venv (after changing dependencies).
constraints: venv
	$(BIN)/python -m pip freeze --exclude-editable | grep -v '^rekey' > constraints.txt
