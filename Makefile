# The two set-up commands of the README. Each creates .venv and installs raypipe when that is missing.
# constraints.txt pins the versions the suite was verified with (pip's resolver backtracks badly without it).
#   make demo   run the main job on embedded defaults (generated corpus, local Ray, SQLite MLflow)
#   make test   run the test suite (what .ci/run calls)
PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: demo test lint install
install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet -e '.[dev,ocr,asr]' -c constraints.txt
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/raypipe demo

# pytest exits 5 when it collected no test: that is a failure here, never a silent green.
test: $(STAMP)
	@$(VENV)/bin/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc

lint: $(STAMP)
	$(VENV)/bin/ruff check .
