# The two commands a new user runs: `make demo` and `make test` (see README.md).
.PHONY: setup test demo bench clean completions man deploy generated

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

# Generated files that are committed and shipped; a test fails when one is stale.
completions: setup  # cbctl/completions/cbctl.{bash,zsh,fish} (package data)
	.venv/bin/python -m cbctl.cli.completion_gen

man: setup  # cbctl/man/man1/cbctl.1 (package data), from the command tree
	.venv/bin/python -m cbctl.cli.manpage

deploy: setup  # deploy/prometheus/cbctl-rules{,.test}.yml and deploy/grafana/cbctl-dashboard.json, from the gate table
	.venv/bin/python -m cbctl.core.operator.deploy_gen

generated: completions man deploy

clean:
	rm -rf .venv build *.egg-info
