#!/usr/bin/env bash
# `make demo`: a local sandbox cluster, preflight, then the whole checklist as one runbook
# (stages 1..3 with their gates and a rollback drill per capability), then the end state.
#
# Repeatable: a sandbox left by an earlier demo is taken down first. Exits non-zero at the first
# failure. Uses the contexts file $CBCTL_CONFIG (default ~/.config/cbctl/config.toml): the
# `sandbox` context is (re)written there and made current; other contexts are left alone.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CBCTL="$ROOT/.venv/bin/cbctl"
export CBCTL_CONFIG="${CBCTL_CONFIG:-$HOME/.config/cbctl/config.toml}"
export CBCTL_SANDBOX_DIR="${CBCTL_SANDBOX_DIR:-${XDG_STATE_HOME:-$HOME/.local/state}/cbctl/demo-sandbox}"
export CBCTL_CONTEXT=sandbox
export NO_COLOR=1
NODES="${DEMO_NODES:-3}"

started=$SECONDS
step() { printf '\n=== [%3ds] %s\n' "$((SECONDS - started))" "$*" >&2; }
on_error() {
    local code=$?
    printf '\nDEMO FAILED (exit %d) after %ds at: %s\n' "$code" "$((SECONDS - started))" "$BASH_COMMAND" >&2
    printf 'Inspect with: %s sandbox status; logs under %s; stop with: %s sandbox down\n' \
        "$CBCTL" "$CBCTL_SANDBOX_DIR" "$CBCTL" >&2
    exit "$code"
}
trap on_error ERR

[[ -x "$CBCTL" ]] || { echo "demo: $CBCTL not found; run 'make setup' first" >&2; exit 2; }

step "fresh sandbox: down (if one is left from an earlier demo), then up with $NODES nodes"
"$CBCTL" sandbox down
"$CBCTL" sandbox up --nodes "$NODES"
"$CBCTL" sandbox status

step "preflight (backends, nodes, node ids, clocks, lease timing)"
"$CBCTL" preflight

step "checklist: runbook full-rollout (stage 1 -> drills -> stage 2 -> drills -> stage 3 -> exit criteria)"
"$CBCTL" runbook run full-rollout --yes \
    --var "reason=make demo" \
    --var "canary_file=$CBCTL_SANDBOX_DIR/canary-lanes.txt" \
    --var "soak=${DEMO_SOAK:-25s}"

step "end state"
"$CBCTL" stage status
"$CBCTL" watch --once

step "demo finished in $((SECONDS - started))s"
cat >&2 <<EOF
The sandbox keeps running (context 'sandbox' is current in $CBCTL_CONFIG). Try:
  $CBCTL nodes                       # live nodes, applied revision, lanes
  $CBCTL watch                       # live metrics of the current stage
  $CBCTL sandbox chaos kill-node node-2
  $CBCTL runbook run rollback-event-bus --var reason=drill
Stop everything with:
  $CBCTL sandbox down
EOF
