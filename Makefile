# The two commands of the README. Each creates or reuses .venv and installs what is missing;
# a second run installs nothing (the stamp is newer than pyproject.toml, the setup script and the constraints file).
VENV   ?= .venv
EXTRAS ?= cpu,dev
STAMP  := $(VENV)/.llmfast-installed
comma  := ,
# The tested set of versions: where EXTRAS has the cpu extra, pip installs with `-c` this file, the exact versions
# the suite last passed with (docs/environment.md). `make install CONSTRAINTS=` (empty) takes the newest releases.
CONSTRAINTS ?= $(if $(filter cpu,$(subst $(comma), ,$(EXTRAS))),constraints/cpu.txt)
PYTEST_ARGS ?=
# The suite keeps about one core busy on average (small models, subprocess start-ups, vLLM start-ups), so two
# workers fill a two-core machine; a file's tests stay on one worker, which keeps their module fixtures shared.
# --no-loadscope-reorder: the files go out in the collection's order (longest first, tests/conftest.py), not in
# xdist's (most tests first), which left the slow vLLM files to the end, run by one worker alone.
TEST_WORKERS ?= 2

.PHONY: demo eval-base test install clean
.DEFAULT_GOAL := demo

# The stamp holds the EXTRAS and CONSTRAINTS it was made with: other ones install again (the same, nothing).
STAMP_SAYS := EXTRAS=$(EXTRAS) CONSTRAINTS=$(CONSTRAINTS)
ifneq ($(shell cat $(STAMP) 2>/dev/null),$(STAMP_SAYS))
.PHONY: $(STAMP)
endif

$(STAMP): pyproject.toml scripts/setup_venv.sh $(CONSTRAINTS)
	bash scripts/setup_venv.sh $(VENV) $(EXTRAS) '$(CONSTRAINTS)'
	echo '$(STAMP_SAYS)' > $@

install: $(STAMP)

# The whole chain on the built-in model (recipes/quickstart.yaml): a second run reuses every finished stage.
demo: $(STAMP)
	$(VENV)/bin/llmfast run recipes/quickstart.yaml
	@echo "report: runs/quickstart/bench/report.md"

# The built-in model alone: perplexity and task accuracy (what `make demo` did before the chain).
eval-base: $(STAMP)
	$(VENV)/bin/llmfast eval recipes/eval_smollm2.yaml

test: $(STAMP)
	$(VENV)/bin/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --max-worker-restart 0 \
		$(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
