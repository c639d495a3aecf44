#!/usr/bin/env bash
# Install the Azure CLI (PyPI `azure-cli`, pinned) into its own virtualenv, for tests/deploy/test_deploy.py,
# which runs every command that `scripts/deploy.sh --dry-run` prints through the real CLI parser.
# Idempotent: does nothing when the venv already has the pinned version (~45 s and ~730 MB otherwise).
#
#   AZCLI_VENV=dir       where to install (default: .venv-azcli in the repo root)
#   AZCLI_PYTHON=python  interpreter for the venv (default: python3.11, else python3; >= 3.10)
#
# It is a separate venv on purpose: azure-cli pins many azure-* SDK versions that must not meet the
# app's own requirements in .venv. This CLI is also usable for a real deployment:
#   AZURE_CLI="$PWD/.venv-azcli/bin/az" ... make deploy
set -euo pipefail

AZURE_CLI_VERSION=2.91.0

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

log() { printf 'install-azure-cli: %s\n' "$*"; }
die() { printf 'install-azure-cli: error: %s\n' "$*" >&2; exit 1; }

venv="${AZCLI_VENV:-.venv-azcli}"
stamp="$venv/.azure-cli-version"

# Two runs at once (make test in two terminals) must not install into the same venv together.
if command -v flock >/dev/null 2>&1; then
    exec 8<"${BASH_SOURCE[0]}"
    flock 8
fi

if [[ -x "$venv/bin/az" && -f "$stamp" && "$(cat "$stamp")" == "$AZURE_CLI_VERSION" ]]; then
    log "azure-cli $AZURE_CLI_VERSION present in $venv"
    exit 0
fi

python_ok() {  # the interpreter exists and is >= 3.10 (azure-cli's minimum)
    "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' >/dev/null 2>&1
}

if [[ -x "$venv/bin/python" ]] && ! python_ok "$venv/bin/python"; then
    log "$venv is broken: recreating it"
    rm -rf "$venv"
fi

if [[ ! -x "$venv/bin/python" ]]; then
    python=""
    for candidate in ${AZCLI_PYTHON:-python3.11 python3}; do
        if command -v "$candidate" >/dev/null 2>&1 && python_ok "$candidate"; then
            python="$candidate"
            break
        fi
    done
    [[ -n "$python" ]] || die "Python >= 3.10 is needed for azure-cli (python3.11 or python3 on PATH)"
    log "creating $venv with $("$python" --version 2>&1)"
    "$python" -m venv "$venv"
fi

log "installing azure-cli $AZURE_CLI_VERSION into $venv (about a minute, ~730 MB)"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "azure-cli==$AZURE_CLI_VERSION"
[[ -x "$venv/bin/az" ]] || die "pip installed azure-cli but $venv/bin/az is missing"
printf '%s\n' "$AZURE_CLI_VERSION" >"$stamp"
log "ready: $venv/bin/az ($AZURE_CLI_VERSION)"
