# Two commands do all set-up: `make demo` runs the offline quickstart, `make test` runs the tests.
# Each creates the pinned environment (outside the clone, keyed on requirements-lock.txt) when missing.
SHELL := /bin/bash
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-slow lint env

env:
	@scripts/env.sh >/dev/null

demo:
	@venv=$$(scripts/env.sh) && "$$venv/bin/automodel" finetune vlm -c examples/vlm/quickstart.yaml $(ARGS)

test:
	@scripts/ensure_chromium.sh
	@venv=$$(scripts/env.sh) && "$$venv/bin/python" -m pytest -q -n 2 $(ARGS)

test-slow:
	@venv=$$(scripts/env.sh) && "$$venv/bin/python" -m pytest -q -n 2 -m slow $(ARGS)

lint:
	@venv=$$(scripts/env.sh) && "$$venv/bin/ruff" check automodel tests && "$$venv/bin/ruff" format --check automodel tests && "$$venv/bin/lint-imports"
