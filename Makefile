# Two commands: `make book` builds the HTML book, `make test` runs every test.
# Both create the virtual environment in .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
WORKERS ?= 2
# Chapters keep training runs here; the book build and nbval share them (see vitcourse.paths.runs_dir).
export VITCOURSE_RUNS ?= $(CURDIR)/_build/runs

.PHONY: book test env clean linkcheck student-notebooks lint

env: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "Python 3.10 or newer is needed; set PYTHON=python3.x")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -r requirements.txt
	touch $(STAMP)

## Build the HTML book into _build/html (executes every chapter; warnings are errors).
book: $(STAMP)
	$(BIN)/jupyter-book build --all -W --keep-going .

## Run every test: unit tests, grader self-tests, and nbval over every notebook.
test: $(STAMP)
	$(BIN)/python -m pytest -n $(WORKERS) --dist loadfile --nbval-lax --nbval-cell-timeout=900

## Lint the package, the tests and the scripts (ruff; settings in pyproject.toml).
lint: $(STAMP)
	$(BIN)/ruff check vitcourse tests benchmarks grading book/_ext

## Check external links (needs the internet; not run in CI).
linkcheck: $(STAMP)
	$(BIN)/jupyter-book build --builder linkcheck .

clean:
	rm -rf _build

## Regenerate the student exercise notebooks from their solution sources (notebooks/solutions/).
student-notebooks: $(STAMP)
	$(BIN)/vitcourse notebooks
