# The two commands of the README. Each creates or reuses .venv and installs what is missing;
# a second run installs nothing (the stamp is newer than pyproject.toml and the setup script).
VENV   ?= .venv
EXTRAS ?= cpu,dev
STAMP  := $(VENV)/.llmfast-installed
PYTEST_ARGS ?=

.PHONY: demo test install clean
.DEFAULT_GOAL := demo

$(STAMP): pyproject.toml scripts/setup_venv.sh
	bash scripts/setup_venv.sh $(VENV) $(EXTRAS)
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/llmfast models
	$(VENV)/bin/llmfast eval recipes/eval_smollm2.yaml

test: $(STAMP)
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
