#!/usr/bin/env bash
# Install everything the tests and the local run need; safe to run again and again (it only does
# what is missing or out of date). Used by `make test`, `make demo` and CI.
#
#   1. rabbitmq-server (Debian package) when /usr/lib/rabbitmq/bin/rabbitmq-server is missing
#   2. npm packages (Azurite, the Cosmos DB-compatible server) when node_modules is missing or older
#      than package-lock.json
#   3. .venv (Python >= 3.11) with requirements-dev.txt, re-installed only when a requirements file
#      changed. VENV=dir and SETUP_PYTHON=interpreter choose another venv / Python (CI tests 3.12 too).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

log() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

# Two targets (e.g. `make test` and `make demo`) may run this at once: one at a time.
if command -v flock >/dev/null 2>&1; then
    exec 9<"${BASH_SOURCE[0]}"
    flock 9
fi

# --- 1. RabbitMQ ----------------------------------------------------------------------------------
rabbitmq_server=/usr/lib/rabbitmq/bin/rabbitmq-server
if [[ -x "$rabbitmq_server" ]]; then
    log "rabbitmq-server present"
else
    command -v apt-get >/dev/null 2>&1 || die "rabbitmq-server is missing and apt-get is not available"
    sudo=()
    if [[ "$(id -u)" -ne 0 ]]; then
        command -v sudo >/dev/null 2>&1 || die "rabbitmq-server is missing; installing it needs root or sudo"
        sudo=(sudo)
    fi
    log "installing rabbitmq-server (apt-get)"
    "${sudo[@]}" apt-get update -qq
    # The package does not start a broker (there is no init system); tools/local_services.py starts
    # an isolated node per test session / demo.
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server >/dev/null
    [[ -x "$rabbitmq_server" ]] || die "apt-get install rabbitmq-server did not provide $rabbitmq_server"
fi

# --- 2. npm packages ------------------------------------------------------------------------------
command -v node >/dev/null 2>&1 || die "node is not on PATH (Node.js 20+ is needed for Azurite and the Cosmos server)"
command -v npm >/dev/null 2>&1 || die "npm is not on PATH"
node_major="$(node -p 'process.versions.node.split(".")[0]')"
(( node_major >= 20 )) || die "Node.js 20+ is needed, found $(node --version)"

# npm writes node_modules/.package-lock.json on every install: it is the marker of the last install.
if [[ ! -f node_modules/.package-lock.json || package-lock.json -nt node_modules/.package-lock.json \
      || package.json -nt node_modules/.package-lock.json ]]; then
    log "installing npm packages (npm ci)"
    npm ci --no-audit --no-fund --loglevel=error
else
    log "node_modules up to date"
fi

# --- 3. Python virtualenv -------------------------------------------------------------------------
python_ok() {  # the interpreter exists and is >= 3.11
    "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' >/dev/null 2>&1
}

venv="${VENV:-.venv}"
if [[ -x "$venv/bin/python" ]] && ! python_ok "$venv/bin/python"; then
    log "$venv is broken or older than Python 3.11: recreating it"
    rm -rf "$venv"
fi

if [[ ! -x "$venv/bin/python" ]]; then
    python=""
    for candidate in ${SETUP_PYTHON:-python3.11 python3}; do
        if command -v "$candidate" >/dev/null 2>&1 && python_ok "$candidate"; then
            python="$candidate"
            break
        fi
    done
    [[ -n "$python" ]] || die "Python >= 3.11 is needed (python3.11 or python3 on PATH)"
    log "creating $venv with $("$python" --version 2>&1)"
    "$python" -m venv "$venv"
fi

stamp="$venv/.requirements.sha256"
wanted="$(cat requirements.txt requirements-dev.txt | sha256sum | cut -d' ' -f1)"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$wanted" ]]; then
    log "installing Python packages (requirements-dev.txt)"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
    printf '%s\n' "$wanted" >"$stamp"
else
    log "Python packages up to date"
fi

log "ready"
