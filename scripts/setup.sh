#!/usr/bin/env bash
# Install everything the tests and the local run need; safe to run again and again (it only does
# what is missing or out of date). Used by `make test`, `make demo` and CI.
#
#   1. rabbitmq-server (Debian package) when /usr/lib/rabbitmq/bin/rabbitmq-server is missing
#   2. npm packages (Azurite, the Cosmos DB-compatible server) when node_modules is missing or older
#      than package-lock.json
#   3. .venv (Python 3.13, the deploy default, whose worker the real-worker tests run) with
#      requirements-dev.txt, re-installed only when a requirements file changed. VENV=dir and
#      PYTHON_VERSION=3.11|3.12|3.13 choose another venv / Python (CI tests all three); SETUP_PYTHON=path
#      names an interpreter directly. Interpreters are looked up on PATH, then in pyenv's versions.
#
# SETUP_SERVICES=0 does step 3 only (no apt, no npm, no Node.js needed): enough for the unit layer and
# lint (`make unit`, `make lint`).
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

setup_services="${SETUP_SERVICES:-1}"
[[ "$setup_services" =~ ^[01]$ ]] || die "SETUP_SERVICES must be 1 (default: everything) or 0 (the venv only), got '$setup_services'"

if [[ "$setup_services" == 1 ]]; then
    # --- 1. RabbitMQ ------------------------------------------------------------------------------
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
        # The package does not start a broker (there is no init system); localdev/local_services.py starts
        # an isolated node per test session / demo.
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server >/dev/null
        [[ -x "$rabbitmq_server" ]] || die "apt-get install rabbitmq-server did not provide $rabbitmq_server"
    fi

    # --- 2. npm packages --------------------------------------------------------------------------
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
else
    log "SETUP_SERVICES=0: skipping rabbitmq-server and the npm packages"
fi

# --- 3. Python virtualenv -------------------------------------------------------------------------
wanted_version="${PYTHON_VERSION:-3.13}"
[[ "$wanted_version" =~ ^3\.(1[1-9])$ ]] || die "PYTHON_VERSION must be 3.11 or newer (3.11, 3.12, 3.13), got '$wanted_version'"

python_version_of() {  # "3.13" for an interpreter that runs, else nothing
    "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true
}

find_python() {  # an interpreter of the wanted version: SETUP_PYTHON, PATH, then pyenv's versions
    local candidate
    local pyenv_root
    pyenv_root="$(pyenv root 2>/dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")"
    for candidate in ${SETUP_PYTHON:-} "python$wanted_version" "$pyenv_root"/versions/"$wanted_version".*/bin/"python$wanted_version"; do
        if [[ "$candidate" == */* ]]; then [[ -x "$candidate" ]] || continue
        else candidate="$(command -v "$candidate" 2>/dev/null)" || continue
        fi
        if [[ "$(python_version_of "$candidate")" == "$wanted_version" ]]; then
            printf '%s\n' "$candidate"
            return 0
        fi
    done
    return 1
}

venv="${VENV:-.venv}"
if [[ -x "$venv/bin/python" && "$(python_version_of "$venv/bin/python")" != "$wanted_version" ]]; then
    log "$venv is not Python $wanted_version (or is broken): recreating it"
    rm -rf "$venv"
fi

if [[ ! -x "$venv/bin/python" ]]; then
    python="$(find_python)" \
        || die "Python $wanted_version is needed (python$wanted_version on PATH, or pyenv install $wanted_version); PYTHON_VERSION=3.11 or 3.12 also work, without the real-worker tests (the worker needs 3.13)"
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
