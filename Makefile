# The two commands a new user runs: `make demo` and `make test` (see README.md).
.PHONY: setup test demo bench clean completions

setup:
	@bash scripts/setup.sh

test: setup
	.venv/bin/python -m pytest -q -p no:cacheprovider

demo: setup
	bash scripts/demo.sh

bench: setup
	.venv/bin/python -m bench

completions: setup
	.venv/bin/python -m cbctl.cli.completion_gen completions

clean:
	rm -rf .venv build *.egg-info
