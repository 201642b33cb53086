# Two commands on a fresh clone:  `make run` (the embedded default pipeline)  and  `make test`.
# Both create .venv once (torch pinned first so that nothing pulls another build), then reuse it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.amrg-installed

.PHONY: run test install clean-artifacts

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e ".[flows,faiss,metrics,serve,test]"
	touch $(STAMP)

run: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" dvc repro

test: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" CUDA_VISIBLE_DEVICES="" $(BIN)/python -m pytest -q

clean-artifacts:
	rm -rf artifacts checkpoints
