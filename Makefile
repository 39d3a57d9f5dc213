# The two commands a new user runs: `make demo` and `make test` (see README.md).
.PHONY: setup test demo bench clean completions

setup:
	@bash scripts/setup.sh

test: setup
	.venv/bin/python -m pytest -q -p no:cacheprovider

demo: setup
	bash scripts/demo.sh

# `make demo-repeat N=10 [BUSY=1]`: the demo N times, each run's result and time, the pass rate.
.PHONY: demo-repeat
N ?= 10
demo-repeat: setup
	.venv/bin/python bench/demo_repeat.py $(N) $(if $(BUSY),--busy)

bench: setup
	.venv/bin/python -m bench

completions: setup
	.venv/bin/python -m cbctl.cli.completion_gen completions

clean:
	rm -rf .venv build *.egg-info
