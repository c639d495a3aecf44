#!/usr/bin/env bash
# Create or update everything the token-refresh function app needs in Azure, then publish the code.
# Idempotent: run it again to apply changed settings or to deploy a new version. See usage() and the
# docs/deploy.md.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
    cat <<'EOF'
Usage: RESOURCE_GROUP=... LOCATION=... APP_NAME=... COSMOS_ACCOUNT=... scripts/deploy.sh [--dry-run]
       scripts/deploy.sh --package FILE.zip
       scripts/deploy.sh --help

Creates or updates, in RESOURCE_GROUP: a storage account, a Service Bus namespace (Standard) with the
queues of localdev/service_bus_queues.json, Log Analytics + Application Insights (with the namespace's and
the app's metrics), a user-assigned managed identity and its role assignments, a Key Vault (purge
protection on), a Flex Consumption function app (Python 3.13) with identity-based connections and no keys
in its settings, the Cosmos DB state container in the existing COSMOS_ACCOUNT (and data-plane roles per
container), and alerts: dead-lettered messages, systemic failures, refresh backlog, missed checks,
retryable failures; then publishes the code (a zip of host.json, requirements.txt, the function folders and
shared/: the files git tracks; remote build). Every variable is checked before the first az command.
Needs `az login` and rights to create role assignments.

Options:
  --dry-run         print every az command (one per line, shell-quoted) instead of running it; values
                    that come from earlier commands' output are shown as <placeholders>
  --package FILE    only build the deployment zip at FILE (no Azure calls) and exit
  -h, --help        show this help

Required environment:
  RESOURCE_GROUP    resource group for the app's resources (created if missing)
  LOCATION          Azure region with Flex Consumption (az functionapp list-flexconsumption-locations)
  APP_NAME          function app name (globally unique: <APP_NAME>.azurewebsites.net)
  COSMOS_ACCOUNT    the platform's existing Cosmos DB (NoSQL) account

Optional environment (default):
  COSMOS_RESOURCE_GROUP                  resource group of COSMOS_ACCOUNT (RESOURCE_GROUP)
  COSMOS_DATABASE                        (integrations)
  COSMOS_CONNECTIONS_CONTAINER           (integration_connections)
  COSMOS_STATE_CONTAINER                 the app's own container, created here (token_refresh_state)
  STORAGE_ACCOUNT                        (st + APP_NAME's letters and digits, at most 24 characters)
  SERVICEBUS_NAMESPACE                   (APP_NAME-bus)
  KEY_VAULT                              (kv-APP_NAME, at most 24 characters)
  IDENTITY_NAME                          (APP_NAME-identity)
  LOG_ANALYTICS_WORKSPACE                (APP_NAME-logs)
  APP_INSIGHTS                           (APP_NAME-insights)
  INSTANCE_MEMORY_MB                     Flex Consumption instance size: 512, 2048 or 4096 (2048)
  MAXIMUM_INSTANCE_COUNT                 Flex Consumption scale-out limit, 1-1000 (10)
  PYTHON_RUNTIME_VERSION                 3.11, 3.12 or 3.13 (3.13: requirements.txt pins its worker to
                                         the version the real-worker tests run)
  PYTHON_THREADPOOL_THREAD_COUNT         the worker's threads (host.json's maxConcurrentCalls, 16)
  TOKEN_REFRESH_INTERVAL_MS              (3600000)
  TOKEN_REFRESH_EXPIRATION_THRESHOLD_MS  (4200000)
  TOKEN_REFRESH_MAX_DELIVERY_COUNT       also the refresh queue's max delivery count (10)
  DUPLICATE_DETECTION_WINDOW             the refresh queue's duplicate detection history window, an ISO 8601
                                         duration from PT20S to P7D (the queue file's, PT2H)
  OUTCOME_QUEUE_TTL                      message TTL of the queues only other services read (refreshed,
                                         refresh.failed, systemic-failure), PT1M to P14D (P1D)
  OUTCOME_QUEUE_MAX_SIZE_MB              their size: 1024, 2048, 3072, 4096 or 5120 (5120)
  RABBITMQ_EXCHANGE                      (integration.events)
  INTEGRATION_MANAGER_URL                base URL of integration-manager; when not given the app keeps
                                         its current value, or gets https://integration-manager.invalid
  RABBITMQ_URL, INTEGRATION_MANAGER_TOKEN
                                         secrets: stored in the Key Vault (never printed) and referenced
                                         from the app settings; when not given, left as they are
  ACTION_GROUP                           an existing action group for the alerts: its name in
                                         RESOURCE_GROUP or its resource id
  ALERT_EMAIL                            or: an e-mail; an action group APP_NAME-alerts is created for it
                                         (neither: the alerts fire in the portal only)
  RETRYABLE_FAILURE_ALERT_PERCENT        alert when this share of an hour's refreshes fail retryable (10)
  DEPLOYER_OBJECT_ID, DEPLOYER_PRINCIPAL_TYPE
                                         who may write the secrets (the signed-in user, User)
  AZURE_CLI                              the az executable (az)
  PYTHON                                 the python3 that reads the queue file and builds the zip (python3)
  DEPLOY_ZIP, DEPLOYMENT_CONTAINER       the zip built (.local/deploy/APP_NAME.zip) and the blob
                                         container Flex Consumption deploys from (app-package)
  TOKEN_REFRESH_ENABLED, TOKEN_REFRESH_SKIP_STATUSES, TOKEN_REFRESH_PAGE_SIZE,
  TOKEN_REFRESH_FAILURE_COOLDOWN_MS, TOKEN_REFRESH_CLAIM_LEASE_MS, TOKEN_REFRESH_MAX_AGE_MS,
  TOKEN_REFRESH_RETRY_DELAY_MS, TOKEN_REFRESH_RATE_LIMITS, TOKEN_REFRESH_SPREAD_MS,
  TOKEN_REFRESH_CHECK_TIME_BUDGET_MS, TOKEN_REFRESH_SYSTEMIC_FAILURE_THRESHOLD,
  TOKEN_REFRESH_SYSTEMIC_FAILURE_WINDOW_MS,
  INTEGRATION_MANAGER_CONNECT_TIMEOUT_MS, INTEGRATION_MANAGER_TIMEOUT_MS,
  INTEGRATION_MANAGER_MAX_ATTEMPTS, INTEGRATION_MANAGER_BACKOFF_INITIAL_MS,
  INTEGRATION_MANAGER_RETRY_BUDGET_MS, INTEGRATION_MANAGER_IN_FLIGHT_MS
                                         copied to the app settings when set (else the app's default)
EOF
}

die() { printf 'deploy: error: %s\n' "$*" >&2; exit 1; }
usage_error() {
    printf 'deploy: error: %s\n\n' "$*" >&2
    usage >&2
    exit 2
}

# --- arguments ------------------------------------------------------------------------------------
dry_run=0
package_only=""
while (($#)); do
    case "$1" in
        --dry-run) dry_run=1 ;;
        --package)
            (($# >= 2)) || usage_error "--package needs a file name"
            package_only="$2"
            shift
            ;;
        -h | --help)
            usage
            exit 0
            ;;
        *) usage_error "unknown argument: $1" ;;
    esac
    shift
done

# --- output helpers -------------------------------------------------------------------------------
# quote WORD: WORD as a shell word (like Python's shlex.quote), so printed lines split back exactly.
quote() {
    local s="$1"
    if [[ -n "$s" && "$s" =~ ^[A-Za-z0-9@%+=:,./_-]+$ ]]; then
        printf '%s' "$s"
    elif [[ "$s" == *"'"* && "$s" != *[\$\`\\\"!]* ]]; then
        printf '"%s"' "$s"  # e.g. a JMESPath query with 'literals'
    else
        printf "'%s'" "${s//\'/\'\"\'\"\'}"
    fi
}

command_line() {  # the az command as one shell-quoted line
    local line="az" arg
    for arg in "$@"; do
        line+=" $(quote "$arg")"
    done
    printf '%s' "$line"
}

# In a dry run, comments go to stdout between the commands; otherwise progress goes to stderr.
note() {
    if ((dry_run)); then printf '# %s\n' "$*"; else printf 'deploy: %s\n' "$*" >&2; fi
}
step() { note "--- $*"; }
warn() { printf 'deploy: warning: %s\n' "$*" >&2; }

az_bin="${AZURE_CLI:-az}"
python="${PYTHON:-python3}"

# az_run ARGS...: run an az command (its output is discarded) or, in a dry run, print it.
az_run() {
    if ((dry_run)); then
        command_line "$@"
        printf '\n'
        return 0
    fi
    printf 'deploy: + %s\n' "$(command_line "$@")" >&2
    "$az_bin" "$@" >/dev/null
}

# az_value VAR PLACEHOLDER ARGS...: VAR = the command's output (one value, tsv). In a dry run the
# command is printed and VAR = PLACEHOLDER. An empty PLACEHOLDER means an empty value is acceptable.
az_value() {
    local __var="$1" __placeholder="$2" __value
    shift 2
    if ((dry_run)); then
        command_line "$@"
        printf '\n'
        printf -v "$__var" '%s' "$__placeholder"
        return 0
    fi
    printf 'deploy: + %s\n' "$(command_line "$@")" >&2
    __value="$("$az_bin" "$@")"
    __value="${__value%$'\r'}"
    [[ -n "$__value" || -z "$__placeholder" ]] || die "no value from: $(command_line "$@")"
    printf -v "$__var" '%s' "$__value"
}

# az_lookup VAR ARGS...: VAR = the output (tsv) of a `show` command whose resource may be missing: empty when
# az answers "not found" (exit code 3); any other failure stops the script. A dry run prints the command and
# assumes the resource is missing (VAR empty).
az_lookup() {
    local __var="$1" __value __errors __status=0
    shift
    printf -v "$__var" '%s' ""
    if ((dry_run)); then
        command_line "$@"
        printf '\n'
        return 0
    fi
    printf 'deploy: + %s\n' "$(command_line "$@")" >&2
    __errors="$(mktemp)"
    __value="$("$az_bin" "$@" 2>"$__errors")" || __status=$?
    if ((__status == 3)); then
        __value=""
    elif ((__status != 0)); then
        cat "$__errors" >&2
        rm -f "$__errors"
        die "failed ($__status): $(command_line "$@")"
    fi
    rm -f "$__errors"
    printf -v "$__var" '%s' "${__value%$'\r'}"
}

# az_exists ARGS...: true when the `show` command finds the resource. A dry run assumes it does not.
az_exists() {
    if ((dry_run)); then
        command_line "$@"
        printf '\n'
        return 1
    fi
    printf 'deploy: + %s\n' "$(command_line "$@")" >&2
    "$az_bin" "$@" >/dev/null 2>&1
}

# --- the deployment zip ---------------------------------------------------------------------------
# Built from an allowlist, not from .funcignore: host.json, requirements.txt and the Python sources
# and function.json files that git tracks in the function folders and shared/. Caches, stray zips,
# local settings and untracked files can never slip in. Entries are sorted and dated 1980-01-01, so
# the same commit always gives the same zip.
build_package() {
    local zip_path="$1"
    command -v "$python" >/dev/null 2>&1 || die "building the zip needs python3 (or PYTHON=...)"
    command -v git >/dev/null 2>&1 || die "building the zip needs git (it packs the files git tracks)"
    mkdir -p "$(dirname "$zip_path")"
    "$python" - "$repo_root" "$zip_path" <<'PY'
import os
import subprocess
import sys
import zipfile

root, zip_path = sys.argv[1], os.path.abspath(sys.argv[2])
FILES = ("host.json", "requirements.txt")
FUNCTIONS = ("check_expiring_timer", "manager_check_handler", "sync_refresh_handler")
FOLDERS = (*FUNCTIONS, "shared")


def allowed(name):
    folder, _, rest = name.partition("/")
    if not rest:
        return name in FILES
    return folder in FOLDERS and "__pycache__" not in rest.split("/") and (
        rest.endswith(".py") or rest.rsplit("/", 1)[-1] == "function.json"
    )


def git_files(*options):
    result = subprocess.run(
        ["git", "-C", root, "ls-files", "-z", *options, "--", *FILES, *FOLDERS], capture_output=True, check=False
    )
    if result.returncode != 0:
        sys.exit("deploy: error: the zip is built from the files git tracks, and `git ls-files` failed in "
                 f"{root}: {result.stderr.decode(errors='replace').strip()}")
    return sorted(name for name in result.stdout.decode().split("\0") if name and allowed(name))


# A tracked file deleted in the working tree is not packed (the deletion is pending).
entries = [name for name in git_files() if os.path.isfile(os.path.join(root, name))]
untracked = git_files("--others", "--exclude-standard")
if untracked:
    print("deploy: warning: not tracked by git, so not in the zip (git add what the app needs): "
          + ", ".join(untracked), file=sys.stderr)
required = [*FILES, *(f"{name}/function.json" for name in FUNCTIONS), *(f"{name}/__init__.py" for name in FOLDERS)]
missing = [name for name in required if name not in entries]
if missing:
    sys.exit(f"deploy: error: the zip would lack {', '.join(missing)} (only files git tracks are packed)")

tmp_path = zip_path + ".tmp"
with zipfile.ZipFile(tmp_path, "w", zipfile.ZIP_DEFLATED) as archive:
    for name in entries:
        info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
        info.external_attr = 0o644 << 16
        info.compress_type = zipfile.ZIP_DEFLATED
        with open(os.path.join(root, name), "rb") as handle:
            archive.writestr(info, handle.read())
os.replace(tmp_path, zip_path)
print(f"deploy: built {zip_path}: {len(entries)} files, functions: {', '.join(FUNCTIONS)}", file=sys.stderr)
PY
}

if [[ -n "$package_only" ]]; then
    build_package "$package_only"
    exit 0
fi

# --- settings: every variable is checked before any az command runs --------------------------------
missing=()
for name in RESOURCE_GROUP LOCATION APP_NAME COSMOS_ACCOUNT; do
    [[ -n "${!name:-}" ]] || missing+=("$name")
done
((${#missing[@]} == 0)) || usage_error "missing required environment variable(s): ${missing[*]}"

# bad_value NAME PROBLEM EXPECTED: one line naming the variable, its value, what is wrong and the form
# expected; exit 2. Values that may hold credentials are not shown.
bad_value() {
    local shown
    case "$1" in
        INTEGRATION_MANAGER_URL) shown="(value not shown)" ;;
        *) shown="$(printf '%q' "${!1}")" ;;
    esac
    printf 'deploy: error: %s=%s: %s; expected %s\n' "$1" "$shown" "$2" "$3" >&2
    exit 2
}
# check_name NAME MIN_LENGTH MAX_LENGTH REGEX EXPECTED: an Azure name's length and characters.
check_name() {
    local value="${!1}"
    ((${#value} >= $2 && ${#value} <= $3)) || bad_value "$1" "${#value} characters" "$5"
    [[ "$value" =~ $4 ]] || bad_value "$1" "not of the expected form" "$5"
}
# check_number NAME MIN MAX: a whole number within the limits.
check_number() {
    local value="${!1}"
    [[ "$value" =~ ^[0-9]{1,15}$ ]] || bad_value "$1" "not a whole number" "a whole number from $2 to $3"
    ((10#$value >= $2 && 10#$value <= $3)) || bad_value "$1" "out of range" "a whole number from $2 to $3"
}
# check_choice NAME CHOICE...: one of the choices, exactly.
check_choice() {
    local name="$1" choice
    shift
    for choice in "$@"; do
        [[ "${!name}" == "$choice" ]] && return 0
    done
    bad_value "$name" "not one of the allowed values" "one of: $*"
}
# iso_seconds DURATION: the seconds of an ISO 8601 duration in days, hours, minutes and seconds (P1D, PT2H,
# P1DT12H, PT90S); fails for any other form.
iso_seconds() {
    [[ "$1" =~ ^P([0-9]{1,6}D)?(T([0-9]{1,9}H)?([0-9]{1,9}M)?([0-9]{1,9}S)?)?$ && "$1" != P && "$1" != *T ]] \
        || return 1
    local days="${BASH_REMATCH[1]%D}" hours="${BASH_REMATCH[3]%H}" minutes="${BASH_REMATCH[4]%M}"
    local seconds="${BASH_REMATCH[5]%S}"
    printf '%s' $((10#${days:-0} * 86400 + 10#${hours:-0} * 3600 + 10#${minutes:-0} * 60 + 10#${seconds:-0}))
}
# check_duration NAME MIN_SECONDS MAX_SECONDS EXPECTED: an ISO 8601 duration within the limits.
check_duration() {
    local seconds
    seconds="$(iso_seconds "${!1}")" || bad_value "$1" "not an ISO 8601 duration" "$4"
    ((seconds >= $2 && seconds <= $3)) || bad_value "$1" "out of range" "$4"
}

# Azure's naming rules: the length and characters each kind of resource allows.
GROUP_NAME='^[-A-Za-z0-9_.()]*[-A-Za-z0-9_()]$'
GROUP_FORM="1-90 letters, digits, hyphens, underscores, periods and parentheses, not ending with a period"
check_name RESOURCE_GROUP 1 90 "$GROUP_NAME" "$GROUP_FORM"
check_name LOCATION 2 40 '^[a-z][a-z0-9]*$' \
    "a region's short name in lowercase, like westeurope (az account list-locations)"
check_name APP_NAME 2 60 '^[A-Za-z0-9][A-Za-z0-9-]*[A-Za-z0-9]$' \
    "2-60 letters, digits and hyphens, starting and ending with a letter or digit"
check_name COSMOS_ACCOUNT 3 44 '^[a-z0-9][a-z0-9-]*[a-z0-9]$' \
    "3-44 lowercase letters, digits and hyphens, starting and ending with a letter or digit"

app_lower="$(printf '%s' "$APP_NAME" | tr '[:upper:]' '[:lower:]' | tr -s '-')"
app_alnum="$(printf '%s' "$app_lower" | tr -cd 'a-z0-9')"

COSMOS_RESOURCE_GROUP="${COSMOS_RESOURCE_GROUP:-$RESOURCE_GROUP}"
COSMOS_DATABASE="${COSMOS_DATABASE:-integrations}"
COSMOS_CONNECTIONS_CONTAINER="${COSMOS_CONNECTIONS_CONTAINER:-integration_connections}"
COSMOS_STATE_CONTAINER="${COSMOS_STATE_CONTAINER:-token_refresh_state}"
STORAGE_ACCOUNT="${STORAGE_ACCOUNT:-$(printf 'st%s' "$app_alnum" | cut -c1-24)}"
SERVICEBUS_NAMESPACE="${SERVICEBUS_NAMESPACE:-$(printf '%s' "$app_lower" | cut -c1-46)-bus}"
KEY_VAULT="${KEY_VAULT:-$(printf 'kv-%s' "$app_lower" | cut -c1-24 | sed 's/-*$//')}"
IDENTITY_NAME="${IDENTITY_NAME:-$APP_NAME-identity}"
LOG_ANALYTICS_WORKSPACE="${LOG_ANALYTICS_WORKSPACE:-$APP_NAME-logs}"
APP_INSIGHTS="${APP_INSIGHTS:-$APP_NAME-insights}"
DEPLOYMENT_CONTAINER="${DEPLOYMENT_CONTAINER:-app-package}"
INSTANCE_MEMORY_MB="${INSTANCE_MEMORY_MB:-2048}"
# A cap by default: Flex Consumption would otherwise scale to 100 instances, each adding ~16 concurrent calls to
# integration-manager and ~1,000 RU/s to the platform's Cosmos account (docs/deploy.md: Instances and threads).
MAXIMUM_INSTANCE_COUNT="${MAXIMUM_INSTANCE_COUNT:-10}"
PYTHON_RUNTIME_VERSION="${PYTHON_RUNTIME_VERSION:-3.13}"
PYTHON_THREADPOOL_THREAD_COUNT="${PYTHON_THREADPOOL_THREAD_COUNT:-}"  # empty: host.json's maxConcurrentCalls
TOKEN_REFRESH_INTERVAL_MS="${TOKEN_REFRESH_INTERVAL_MS:-3600000}"
TOKEN_REFRESH_EXPIRATION_THRESHOLD_MS="${TOKEN_REFRESH_EXPIRATION_THRESHOLD_MS:-4200000}"
TOKEN_REFRESH_MAX_DELIVERY_COUNT="${TOKEN_REFRESH_MAX_DELIVERY_COUNT:-10}"
DUPLICATE_DETECTION_WINDOW="${DUPLICATE_DETECTION_WINDOW:-}"  # empty: the queue file's window
OUTCOME_QUEUE_TTL="${OUTCOME_QUEUE_TTL:-P1D}"
OUTCOME_QUEUE_MAX_SIZE_MB="${OUTCOME_QUEUE_MAX_SIZE_MB:-5120}"
RABBITMQ_EXCHANGE="${RABBITMQ_EXCHANGE:-integration.events}"
INTEGRATION_MANAGER_URL="${INTEGRATION_MANAGER_URL:-}"
ACTION_GROUP="${ACTION_GROUP:-}"
ALERT_EMAIL="${ALERT_EMAIL:-}"
RETRYABLE_FAILURE_ALERT_PERCENT="${RETRYABLE_FAILURE_ALERT_PERCENT:-10}"
DEPLOYER_OBJECT_ID="${DEPLOYER_OBJECT_ID:-}"
DEPLOYER_PRINCIPAL_TYPE="${DEPLOYER_PRINCIPAL_TYPE:-User}"
DEPLOY_ZIP="${DEPLOY_ZIP:-$repo_root/.local/deploy/$APP_NAME.zip}"
PLACEHOLDER_MANAGER_URL="https://integration-manager.invalid"

check_name COSMOS_RESOURCE_GROUP 1 90 "$GROUP_NAME" "$GROUP_FORM"
# Cosmos names also form the role assignments' scopes (/dbs/<database>/colls/<container>): no slash.
COSMOS_NAME='^[^/\\#?[:space:]]([^/\\#?]*[^/\\#?[:space:]])?$'
COSMOS_FORM="1-255 characters without / \\ # ? and without leading or trailing spaces"
for name in COSMOS_DATABASE COSMOS_CONNECTIONS_CONTAINER COSMOS_STATE_CONTAINER; do
    check_name "$name" 1 255 "$COSMOS_NAME" "$COSMOS_FORM"
done
check_name STORAGE_ACCOUNT 3 24 '^[a-z0-9]+$' "3-24 lowercase letters and digits"
check_name SERVICEBUS_NAMESPACE 6 50 '^[A-Za-z][A-Za-z0-9-]*[A-Za-z0-9]$' \
    "6-50 letters, digits and hyphens, starting with a letter (set it when APP_NAME starts with a digit)"
[[ "$SERVICEBUS_NAMESPACE" != *-sb && "$SERVICEBUS_NAMESPACE" != *-mgmt ]] \
    || bad_value SERVICEBUS_NAMESPACE "ends with -sb or -mgmt, which Service Bus reserves" "a name not ending so"
check_name KEY_VAULT 3 24 '^[A-Za-z]([A-Za-z0-9]|-[A-Za-z0-9])*$' \
    "3-24 letters, digits and single hyphens, starting with a letter and ending with a letter or digit"
check_name IDENTITY_NAME 3 128 '^[A-Za-z0-9][A-Za-z0-9_-]*$' \
    "3-128 letters, digits, hyphens and underscores, starting with a letter or digit"
check_name LOG_ANALYTICS_WORKSPACE 4 63 '^[A-Za-z0-9][A-Za-z0-9-]*[A-Za-z0-9]$' \
    "4-63 letters, digits and hyphens, starting and ending with a letter or digit"
check_name APP_INSIGHTS 1 255 '^[^%&\\?/[:cntrl:]]*[^%&\\?/. [:cntrl:]]$' \
    "1-255 characters without % & \\ ? /, not ending with a space or period"
check_name DEPLOYMENT_CONTAINER 3 63 '^[a-z0-9]+(-[a-z0-9]+)*$' \
    "3-63 lowercase letters, digits and single hyphens, starting and ending with a letter or digit"
check_choice INSTANCE_MEMORY_MB 512 2048 4096
check_number MAXIMUM_INSTANCE_COUNT 1 1000
check_choice PYTHON_RUNTIME_VERSION 3.11 3.12 3.13
if [[ -n "$PYTHON_THREADPOOL_THREAD_COUNT" ]]; then
    check_number PYTHON_THREADPOOL_THREAD_COUNT 1 256
fi
# The app's own limits (shared/settings.py; tests/deploy/test_deploy.py keeps these equal to them).
check_number TOKEN_REFRESH_INTERVAL_MS 1000 604800000
check_number TOKEN_REFRESH_EXPIRATION_THRESHOLD_MS 0 31536000000
((10#$TOKEN_REFRESH_EXPIRATION_THRESHOLD_MS >= 10#$TOKEN_REFRESH_INTERVAL_MS)) \
    || bad_value TOKEN_REFRESH_EXPIRATION_THRESHOLD_MS \
        "shorter than TOKEN_REFRESH_INTERVAL_MS ($TOKEN_REFRESH_INTERVAL_MS), which the app refuses at start" \
        "at least the interval; recommended: the interval + 5 to 10 minutes"
# The refresh queue's max delivery count too (Service Bus allows up to 2000, the app 100).
check_number TOKEN_REFRESH_MAX_DELIVERY_COUNT 1 100
if [[ -n "$DUPLICATE_DETECTION_WINDOW" ]]; then
    # Service Bus keeps a duplicate detection history of 20 seconds to 7 days.
    check_duration DUPLICATE_DETECTION_WINDOW 20 604800 \
        "an ISO 8601 duration from PT20S to P7D, like PT2H or P1DT12H"
fi
check_duration OUTCOME_QUEUE_TTL 60 1209600 "an ISO 8601 duration from PT1M to P14D, like P1D or PT12H"
# A Standard namespace's queue sizes.
check_choice OUTCOME_QUEUE_MAX_SIZE_MB 1024 2048 3072 4096 5120
check_name RABBITMQ_EXCHANGE 1 255 '^[A-Za-z0-9_.:-]+$' "1-255 letters, digits, periods, colons, hyphens, underscores"
if [[ -n "$INTEGRATION_MANAGER_URL" ]]; then
    [[ "$INTEGRATION_MANAGER_URL" =~ ^https://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[^?#[:space:]@]*)?$ ]] \
        || bad_value INTEGRATION_MANAGER_URL \
            "not an https:// URL, or one with a query, fragment, credentials or spaces" \
            "a base URL like https://integration-manager.example.com"
fi
if [[ -n "$ACTION_GROUP" && -n "$ALERT_EMAIL" ]]; then
    bad_value ACTION_GROUP "given together with ALERT_EMAIL" \
        "one of them: ACTION_GROUP (an existing action group) or ALERT_EMAIL (the script creates one)"
fi
if [[ -n "$ACTION_GROUP" && "$ACTION_GROUP" == /* ]]; then
    action_group_path='^/subscriptions/[^/]+/resource[Gg]roups/[^/]+/providers/[Mm]icrosoft\.[Ii]nsights/'
    [[ "$ACTION_GROUP" =~ ${action_group_path}[Aa]ction[Gg]roups/[^/]+$ ]] \
        || bad_value ACTION_GROUP "not an action group's resource id" \
            "/subscriptions/…/resourceGroups/…/providers/Microsoft.Insights/actionGroups/NAME, or a name only"
elif [[ -n "$ACTION_GROUP" ]]; then
    check_name ACTION_GROUP 1 260 '^[A-Za-z0-9][-A-Za-z0-9_.()]*$' \
        "the name of an action group in RESOURCE_GROUP, or its full resource id"
fi
if [[ -n "$ALERT_EMAIL" ]]; then
    check_name ALERT_EMAIL 3 254 '^[^@[:space:]]+@[^@[:space:]]+\.[^@[:space:]]+$' \
        "an e-mail address like oncall@example.com"
fi
check_number RETRYABLE_FAILURE_ALERT_PERCENT 1 100
GUID='^[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}$'
if [[ -n "$DEPLOYER_OBJECT_ID" ]]; then
    check_name DEPLOYER_OBJECT_ID 36 36 "$GUID" "an object id (a GUID) of Microsoft Entra ID"
fi
check_choice DEPLOYER_PRINCIPAL_TYPE User ServicePrincipal Group ForeignGroup

# Application settings copied from the environment when set (else the app's own default applies), with the
# app's limits for the numbers (shared/settings.py).
passthrough_numbers=(
    "TOKEN_REFRESH_PAGE_SIZE 1 1000"
    "TOKEN_REFRESH_CHECK_TIME_BUDGET_MS 1 3600000"
    "TOKEN_REFRESH_SPREAD_MS 0 86400000"
    "TOKEN_REFRESH_FAILURE_COOLDOWN_MS 0 31536000000"
    "TOKEN_REFRESH_CLAIM_LEASE_MS 1000 86400000"
    "TOKEN_REFRESH_MAX_AGE_MS 0 315360000000"
    "TOKEN_REFRESH_RETRY_DELAY_MS 0 3600000"
    "TOKEN_REFRESH_SYSTEMIC_FAILURE_THRESHOLD 1 200"
    "TOKEN_REFRESH_SYSTEMIC_FAILURE_WINDOW_MS 60000 86400000"
    "INTEGRATION_MANAGER_CONNECT_TIMEOUT_MS 100 60000"
    "INTEGRATION_MANAGER_TIMEOUT_MS 100 600000"
    "INTEGRATION_MANAGER_MAX_ATTEMPTS 1 10"
    "INTEGRATION_MANAGER_BACKOFF_INITIAL_MS 1 60000"
    "INTEGRATION_MANAGER_RETRY_BUDGET_MS 1000 300000"
    "INTEGRATION_MANAGER_IN_FLIGHT_MS 0 600000"
)
passthrough_settings=(TOKEN_REFRESH_ENABLED TOKEN_REFRESH_SKIP_STATUSES TOKEN_REFRESH_RATE_LIMITS)
for entry in "${passthrough_numbers[@]}"; do
    read -r name low high <<<"$entry"
    passthrough_settings+=("$name")
    if [[ -n "${!name:-}" ]]; then
        check_number "$name" "$low" "$high"
    fi
done
if [[ -n "${TOKEN_REFRESH_ENABLED:-}" ]]; then
    check_choice TOKEN_REFRESH_ENABLED true false
fi
if [[ -n "${TOKEN_REFRESH_SKIP_STATUSES:-}" ]]; then
    check_name TOKEN_REFRESH_SKIP_STATUSES 1 1000 '^[^,[:cntrl:]]+(,[^,[:cntrl:]]+)*$' \
        "comma-separated statuses, like revoked,disabled,deleted"
fi
if [[ -n "${TOKEN_REFRESH_RATE_LIMITS:-}" ]]; then
    rate='[^,=[:space:]]+=[0-9]+(\.[0-9]+)?/(s|min|h)'
    check_name TOKEN_REFRESH_RATE_LIMITS 1 10000 "^$rate(,$rate)*$" \
        "comma-separated integrationId=N/s (or N/min, N/h), like salesforce=5/s,*=50/s"
fi
if ((10#$TOKEN_REFRESH_EXPIRATION_THRESHOLD_MS < 10#$TOKEN_REFRESH_INTERVAL_MS + 300000)); then
    warn "TOKEN_REFRESH_EXPIRATION_THRESHOLD_MS is shorter than TOKEN_REFRESH_INTERVAL_MS + 5 min:" \
        "a token can expire between two checks"
fi
[[ -n "$ALERT_EMAIL$ACTION_GROUP" ]] \
    || warn "neither ACTION_GROUP nor ALERT_EMAIL given: the alerts fire in the portal only, nobody is notified"

# A GUID derived from text (for idempotent Cosmos DB role assignments: same input, same id).
guid_of() {
    local hex
    if command -v sha256sum >/dev/null 2>&1; then
        hex="$(printf '%s' "$1" | sha256sum | cut -c1-32)"
    else
        hex="$(printf '%s' "$1" | shasum -a 256 | cut -c1-32)"
    fi
    printf '%s-%s-%s-%s-%s' "${hex:0:8}" "${hex:8:4}" "${hex:12:4}" "${hex:16:4}" "${hex:20:12}"
}

# expires_at_indexing POLICY_JSON: "indexed" when a Cosmos indexing policy indexes /oauth/expiresAt, "excluded"
# when it leaves it out, else what is wrong with the input. Cosmos applies the most precise matching path (an exact
# `/?` path beats a `/*` one of the same prefix); mode "none" indexes nothing.
expires_at_indexing() {
    "$python" - "$1" <<'PY'
import json
import sys

TARGET = "/oauth/expiresAt/?"
try:
    policy = json.loads(sys.argv[1])
    if not isinstance(policy, dict):
        raise ValueError("not an object")
except ValueError as error:
    sys.exit(print(f"unreadable: {error}"))


def precision(path):  # None when the path does not cover TARGET; higher is more precise
    path = path.strip()
    if path.endswith("/?"):
        return (len(path), 1) if path == TARGET else None
    if path.endswith("/*") and TARGET.startswith(path[:-1]):
        return (len(path) - 1, 0)
    return None


matches = [
    (precision(entry.get("path", "")), included)
    for key, included in (("excludedPaths", False), ("includedPaths", True))
    for entry in policy.get(key) or []
    if isinstance(entry, dict) and precision(entry.get("path", "")) is not None
]
indexed = str(policy.get("indexingMode", "consistent")).lower() != "none" and bool(matches)
if indexed:
    indexed = max(matches, key=lambda match: match[0])[1]  # excluded come first: a tie stays excluded
print("indexed" if indexed else "excluded")
PY
}

if ((!dry_run)); then
    command -v "$az_bin" >/dev/null 2>&1 || die "the Azure CLI ($az_bin) is not on PATH; see docs/deploy.md"
fi

# --- the Service Bus queues: localdev/service_bus_queues.json -------------------------------------
# The one list of the app's queues and their properties (the Service Bus model the tests and the local
# host run on reads it too). Each line of queue_plan: the tab-separated `az servicebus queue create`
# arguments of one queue after the resource group and namespace, with the overrides for the refresh
# queue: maxDeliveryCount = TOKEN_REFRESH_MAX_DELIVERY_COUNT, duplicateDetectionHistoryTimeWindow =
# DUPLICATE_DETECTION_WINDOW (when set), and for the outcome queues a message TTL (OUTCOME_QUEUE_TTL, unless the
# file gives one) and a size (OUTCOME_QUEUE_MAX_SIZE_MB).
queue_file="$repo_root/localdev/service_bus_queues.json"
refresh_queue=integration.token.refresh-requested
# The queues the app only sends to (no function here reads them): nothing in Azure may ever consume them, so a
# TTL keeps them from filling up until sends, and with them refreshes, fail (docs/deploy.md).
outcome_queues="integration.token.refreshed integration.token.refresh.failed integration.token.refresh.systemic-failure"
command -v "$python" >/dev/null 2>&1 || die "reading $queue_file needs python3 (or PYTHON=...)"
queue_plan="$("$python" - "$queue_file" "$refresh_queue" "$TOKEN_REFRESH_MAX_DELIVERY_COUNT" \
    "$DUPLICATE_DETECTION_WINDOW" "$outcome_queues" "$OUTCOME_QUEUE_TTL" "$OUTCOME_QUEUE_MAX_SIZE_MB" <<'PY'
import json
import re
import sys

path, refresh_queue, max_delivery_count, window, outcome_queues, outcome_ttl, outcome_size = sys.argv[1:]
outcome_queues = outcome_queues.split()
DURATION = re.compile(r"P(?:([0-9]+)D)?(?:T(?:([0-9]+)H)?(?:([0-9]+)M)?(?:([0-9]+)S)?)?")
KEYS = {
    "maxDeliveryCount",
    "lockDuration",
    "defaultMessageTimeToLive",
    "requiresSession",
    "requiresDuplicateDetection",
    "duplicateDetectionHistoryTimeWindow",
    "deadLetteringOnMessageExpiration",
}


def fail(message):
    sys.exit(f"deploy: error: {path}: {message}")


def duration(queue, key, value, low, high):  # in seconds (Service Bus's limits)
    match = DURATION.fullmatch(value) if isinstance(value, str) else None
    if not match or value in ("P", "PT") or value.endswith("T"):
        fail(f"{queue}: {key} must be an ISO 8601 duration like PT5M, not {value!r}")
    d, h, m, s = (int(group or 0) for group in match.groups())
    if not low <= d * 86400 + h * 3600 + m * 60 + s <= high:
        fail(f"{queue}: {key} is out of range: {value}")
    return value


def flag(queue, key, value):
    if not isinstance(value, bool):
        fail(f"{queue}: {key} must be true or false, not {value!r}")
    return "true" if value else "false"


try:
    with open(path, encoding="utf-8") as handle:
        queues = json.load(handle)["queues"]
    items = list(queues.items())
except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
    fail(f"cannot read the queues: {error!r}")
if refresh_queue not in queues:
    fail(f"the refresh queue {refresh_queue} is missing")
for name in outcome_queues:
    if name not in queues:
        fail(f"the outcome queue {name} is missing (the app sends to it)")
for name, properties in items:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) or not isinstance(properties, dict):
        fail(f"bad queue entry {name!r}")
    if "maxMessageSizeInKilobytes" in properties:
        fail(f"{name}: maxMessageSizeInKilobytes is for Premium namespaces; this one is Standard (256 KB)")
    unknown = sorted(set(properties) - KEYS)
    if unknown:
        fail(f"{name}: unknown properties {', '.join(unknown)} (deploy.sh knows {', '.join(sorted(KEYS))})")
    properties = dict(properties)
    if name == refresh_queue:
        properties["maxDeliveryCount"] = int(max_delivery_count)
        if window and properties.get("requiresDuplicateDetection") is True:
            properties["duplicateDetectionHistoryTimeWindow"] = window
        elif window:
            print(f"deploy: warning: DUPLICATE_DETECTION_WINDOW ignored: {path} gives {name} no duplicate detection",
                  file=sys.stderr)
    if name in outcome_queues:
        properties.setdefault("defaultMessageTimeToLive", outcome_ttl)
    args = ["--name", name]
    if "maxDeliveryCount" in properties:
        count = properties["maxDeliveryCount"]
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 2000:
            fail(f"{name}: maxDeliveryCount must be a whole number from 1 to 2000, not {count!r}")
        args += ["--max-delivery-count", str(count)]
    if "lockDuration" in properties:
        args += ["--lock-duration", duration(name, "lockDuration", properties["lockDuration"], 1, 300)]
    if "defaultMessageTimeToLive" in properties:
        ttl = duration(name, "defaultMessageTimeToLive", properties["defaultMessageTimeToLive"], 1, 10**15)
        args += ["--default-message-time-to-live", ttl]
    if flag(name, "requiresSession", properties.get("requiresSession", False)) == "true":
        args += ["--enable-session", "true"]
    key = "duplicateDetectionHistoryTimeWindow"
    if flag(name, "requiresDuplicateDetection", properties.get("requiresDuplicateDetection", False)) == "true":
        args += ["--duplicate-detection", "true"]
        if key in properties:  # else Service Bus's default, 10 minutes
            window_value = duration(name, key, properties[key], 20, 7 * 86400)
            args += ["--duplicate-detection-history-time-window", window_value]
    elif key in properties:
        fail(f"{name}: {key} without requiresDuplicateDetection")
    if "deadLetteringOnMessageExpiration" in properties:
        expire = flag(name, "deadLetteringOnMessageExpiration", properties["deadLetteringOnMessageExpiration"])
        args += ["--enable-dead-lettering-on-message-expiration", expire]
    if name in outcome_queues:
        args += ["--max-size", outcome_size]
    print("\t".join(args))
PY
)"

# One worker thread per message the Service Bus trigger hands over at once (host.json maxConcurrentCalls): the
# worker's default pool, min(32, CPUs + 4), is 5-6 threads on a Flex instance, so most of the 16 deliveries would
# wait for a thread while their message locks run.
if [[ -z "$PYTHON_THREADPOOL_THREAD_COUNT" ]]; then
    PYTHON_THREADPOOL_THREAD_COUNT="$("$python" - "$repo_root/host.json" <<'PY'
import json
import sys

try:
    with open(sys.argv[1], encoding="utf-8") as handle:
        calls = json.load(handle)["extensions"]["serviceBus"]["maxConcurrentCalls"]
except (OSError, ValueError, KeyError, TypeError) as error:
    sys.exit(f"deploy: error: cannot read extensions.serviceBus.maxConcurrentCalls from {sys.argv[1]}: {error!r}")
if isinstance(calls, bool) or not isinstance(calls, int) or not 1 <= calls <= 256:
    sys.exit(f"deploy: error: {sys.argv[1]}: maxConcurrentCalls must be a whole number from 1 to 256, not {calls!r}")
print(calls)
PY
)"
fi

# Values read from Azure by az_value (placeholders in a dry run).
subscription_id="" principal_id="" client_id="" insights_connection_string="" cosmos_endpoint=""
deployer_id="" current_manager_url="" existing_sessions="" connections_index="" account_wide="" known_action_group=""

# --- 0. subscription ------------------------------------------------------------------------------
step "subscription (az login first)"
az_value subscription_id '<subscription-id>' account show --query id --output tsv
arm_id() {  # arm_id RESOURCE_GROUP PROVIDER/TYPE NAME
    printf '/subscriptions/%s/resourceGroups/%s/providers/%s/%s' "$subscription_id" "$1" "$2" "$3"
}
identity_id="$(arm_id "$RESOURCE_GROUP" Microsoft.ManagedIdentity/userAssignedIdentities "$IDENTITY_NAME")"
storage_id="$(arm_id "$RESOURCE_GROUP" Microsoft.Storage/storageAccounts "$STORAGE_ACCOUNT")"
servicebus_id="$(arm_id "$RESOURCE_GROUP" Microsoft.ServiceBus/namespaces "$SERVICEBUS_NAMESPACE")"
vault_id="$(arm_id "$RESOURCE_GROUP" Microsoft.KeyVault/vaults "$KEY_VAULT")"
workspace_id="$(arm_id "$RESOURCE_GROUP" Microsoft.OperationalInsights/workspaces "$LOG_ANALYTICS_WORKSPACE")"
insights_id="$(arm_id "$RESOURCE_GROUP" Microsoft.Insights/components "$APP_INSIGHTS")"
functionapp_id="$(arm_id "$RESOURCE_GROUP" Microsoft.Web/sites "$APP_NAME")"
tags=("app=$APP_NAME" "managed-by=scripts/deploy.sh")

# --- 1. resource group ----------------------------------------------------------------------------
step "resource group"
az_run group create --name "$RESOURCE_GROUP" --location "$LOCATION" --tags "${tags[@]}" --output none

# --- 2. managed identity --------------------------------------------------------------------------
step "user-assigned managed identity (the app's only credential)"
az_run identity create --name "$IDENTITY_NAME" --resource-group "$RESOURCE_GROUP" --location "$LOCATION" \
    --tags "${tags[@]}" --output none
az_value principal_id '<identity-principal-id>' identity show --name "$IDENTITY_NAME" \
    --resource-group "$RESOURCE_GROUP" --query principalId --output tsv
az_value client_id '<identity-client-id>' identity show --name "$IDENTITY_NAME" \
    --resource-group "$RESOURCE_GROUP" --query clientId --output tsv

# --- 3. storage -----------------------------------------------------------------------------------
step "storage account (AzureWebJobsStorage and the deployment container; no shared keys)"
az_run storage account create --name "$STORAGE_ACCOUNT" --resource-group "$RESOURCE_GROUP" \
    --location "$LOCATION" --sku Standard_LRS --kind StorageV2 --https-only true --min-tls-version TLS1_2 \
    --allow-blob-public-access false --allow-shared-key-access false --tags "${tags[@]}" --output none
az_run storage container-rm create --storage-account "$STORAGE_ACCOUNT" --resource-group "$RESOURCE_GROUP" \
    --name "$DEPLOYMENT_CONTAINER" --output none

# --- 4. Service Bus -------------------------------------------------------------------------------
step "Service Bus namespace (Standard: duplicate detection; Entra ID auth only), localdev/service_bus_queues.json"
az_run servicebus namespace create --name "$SERVICEBUS_NAMESPACE" --resource-group "$RESOURCE_GROUP" \
    --location "$LOCATION" --sku Standard --min-tls 1.2 --disable-local-auth true --tags "${tags[@]}" \
    --output none
# Service Bus cannot change RequiresSession on an existing queue: a refresh queue an earlier deployment
# created with sessions (the file now says none) has to be drained, deleted and created again.
refresh_sessions=false
while IFS= read -r queue_line; do
    if [[ "$queue_line"$'\t' == "--name"$'\t'"$refresh_queue"$'\t'* \
        && $'\t'"$queue_line"$'\t' == *$'\t'--enable-session$'\t'true$'\t'* ]]; then
        refresh_sessions=true
    fi
done <<<"$queue_plan"
note "stop if $refresh_queue exists with RequiresSession other than $refresh_sessions (it cannot be changed):"
az_lookup existing_sessions servicebus queue show --resource-group "$RESOURCE_GROUP" \
    --namespace-name "$SERVICEBUS_NAMESPACE" --name "$refresh_queue" --query requiresSession --output tsv
existing_sessions="$(printf '%s' "$existing_sessions" | tr '[:upper:]' '[:lower:]')"
if [[ -n "$existing_sessions" && "$existing_sessions" != "$refresh_sessions" ]]; then
    die "queue $refresh_queue in namespace $SERVICEBUS_NAMESPACE has RequiresSession=$existing_sessions but" \
        "localdev/service_bus_queues.json says $refresh_sessions, and Service Bus cannot change RequiresSession on" \
        "an existing queue: let it drain (no active or scheduled messages), then run \`az servicebus queue delete" \
        "--resource-group $RESOURCE_GROUP --namespace-name $SERVICEBUS_NAMESPACE --name $refresh_queue\` and" \
        "run this script again (docs/deploy.md)"
fi
while IFS= read -r -u 3 queue_line; do  # fd 3: az keeps the script's stdin
    IFS=$'\t' read -r -a queue_args <<<"$queue_line"
    az_run servicebus queue create --resource-group "$RESOURCE_GROUP" --namespace-name "$SERVICEBUS_NAMESPACE" \
        "${queue_args[@]}" --output none
done 3<<<"$queue_plan"

# --- 5. monitoring --------------------------------------------------------------------------------
step "Log Analytics workspace and Application Insights (Entra ID ingestion only)"
az_run monitor log-analytics workspace create --resource-group "$RESOURCE_GROUP" \
    --workspace-name "$LOG_ANALYTICS_WORKSPACE" --location "$LOCATION" --tags "${tags[@]}" --output none
insights_body="$(printf '{"location":"%s","kind":"web","tags":{"app":"%s"},"properties":{"Application_Type":"web","WorkspaceResourceId":"%s","DisableLocalAuth":true}}' \
    "$LOCATION" "$APP_NAME" "$workspace_id")"
az_run resource create --resource-group "$RESOURCE_GROUP" --name "$APP_INSIGHTS" \
    --resource-type Microsoft.Insights/components --api-version 2020-02-02 --is-full-object \
    --properties "$insights_body" --output none
az_value insights_connection_string '<app-insights-connection-string>' resource show --ids "$insights_id" \
    --api-version 2020-02-02 --query properties.ConnectionString --output tsv

# --- 6. Cosmos DB (existing account) --------------------------------------------------------------
step "Cosmos DB: endpoint, the app's state container, the connections container's index, data-plane roles"
az_value cosmos_endpoint '<cosmos-document-endpoint>' cosmosdb show --name "$COSMOS_ACCOUNT" \
    --resource-group "$COSMOS_RESOURCE_GROUP" --query documentEndpoint --output tsv
cosmos_container=(--account-name "$COSMOS_ACCOUNT" --resource-group "$COSMOS_RESOURCE_GROUP"
    --database-name "$COSMOS_DATABASE")
if az_exists cosmosdb sql container show "${cosmos_container[@]}" --name "$COSMOS_STATE_CONTAINER" --output none; then
    note "state container $COSMOS_STATE_CONTAINER exists"
else
    note "when the state container is missing:"
    az_run cosmosdb sql container create "${cosmos_container[@]}" --name "$COSMOS_STATE_CONTAINER" \
        --partition-key-path /id --ttl -1 --output none
fi
# TTL on (-1: items expire only by their own ttl) on every run: a container created or changed by hand
# without it would keep every claim and failure record forever.
az_run cosmosdb sql container update "${cosmos_container[@]}" --name "$COSMOS_STATE_CONTAINER" --ttl -1 --output none

note "check that the connections container indexes /oauth/expiresAt (the check's range filter and ORDER BY):"
az_lookup connections_index cosmosdb sql container show "${cosmos_container[@]}" \
    --name "$COSMOS_CONNECTIONS_CONTAINER" --query resource.indexingPolicy --output json
if ((!dry_run)); then
    index_verdict="$(expires_at_indexing "$connections_index")"
    fix="add {\"path\": \"/oauth/expiresAt/?\"} to includedPaths (or remove the exclusion) with \`az cosmosdb sql"
    fix+=" container update --account-name $COSMOS_ACCOUNT --resource-group $COSMOS_RESOURCE_GROUP --database-name"
    fix+=" $COSMOS_DATABASE --name $COSMOS_CONNECTIONS_CONTAINER --idx @policy.json\` (docs/deploy.md)"
    case "$index_verdict" in
        indexed) note "connections container $COSMOS_CONNECTIONS_CONTAINER indexes /oauth/expiresAt" ;;
        excluded)
            warn "the indexing policy of $COSMOS_DATABASE/$COSMOS_CONNECTIONS_CONTAINER leaves /oauth/expiresAt" \
                "out: every check fails on its ORDER BY (or scans the whole container); $fix"
            ;;
        *)
            warn "could not read the indexing policy of $COSMOS_DATABASE/$COSMOS_CONNECTIONS_CONTAINER" \
                "($index_verdict)"
            ;;
    esac
fi

# Data plane only, each container its own role: the app reads connections (connection_store.py never writes
# them) and reads and writes its state container. Built-in roles: 1 = Data Reader, 2 = Data Contributor.
cosmos_reader=00000000-0000-0000-0000-000000000001
cosmos_contributor=00000000-0000-0000-0000-000000000002
assign_cosmos_role() {  # assign_cosmos_role ROLE_DEFINITION CONTAINER
    local scope="/dbs/$COSMOS_DATABASE/colls/$2"
    az_run cosmosdb sql role assignment create --account-name "$COSMOS_ACCOUNT" \
        --resource-group "$COSMOS_RESOURCE_GROUP" --scope "$scope" --principal-id "$principal_id" \
        --role-definition-id "$1" --role-assignment-id "$(guid_of "$COSMOS_ACCOUNT/$principal_id/$1$scope")" \
        --output none
}
assign_cosmos_role "$cosmos_reader" "$COSMOS_CONNECTIONS_CONTAINER"
assign_cosmos_role "$cosmos_contributor" "$COSMOS_STATE_CONTAINER"
# Earlier deployments gave Data Contributor on the whole account (scope /): removed once the scoped ones exist.
account_wide_assignment="$(guid_of "$COSMOS_ACCOUNT/$principal_id/$cosmos_contributor")"
az_lookup account_wide cosmosdb sql role assignment show --account-name "$COSMOS_ACCOUNT" \
    --resource-group "$COSMOS_RESOURCE_GROUP" --role-assignment-id "$account_wide_assignment" --query id --output tsv
if [[ -n "$account_wide" ]] || ((dry_run)); then
    note "when the account-wide assignment of an earlier deployment exists:"
    az_run cosmosdb sql role assignment delete --account-name "$COSMOS_ACCOUNT" \
        --resource-group "$COSMOS_RESOURCE_GROUP" --role-assignment-id "$account_wide_assignment" --yes --output none
fi

# --- 7. Key Vault ---------------------------------------------------------------------------------
step "Key Vault (RBAC) for RABBITMQ_URL and INTEGRATION_MANAGER_TOKEN"
if az_exists keyvault show --name "$KEY_VAULT" --resource-group "$RESOURCE_GROUP" --output none; then
    note "Key Vault $KEY_VAULT exists"
else
    note "when the Key Vault is missing:"
    az_run keyvault create --name "$KEY_VAULT" --resource-group "$RESOURCE_GROUP" --location "$LOCATION" \
        --enable-rbac-authorization true --retention-days 90 --enable-purge-protection true --tags "${tags[@]}" \
        --output none
fi
# Purge protection on an existing vault too (irreversible): a deleted secret or vault stays recoverable for the
# retention days, and nobody, not even with this script's rights, can purge it earlier.
az_run keyvault update --name "$KEY_VAULT" --resource-group "$RESOURCE_GROUP" --enable-purge-protection true \
    --output none
vault_uri="https://$KEY_VAULT.vault.azure.net/"

# --- 8. role assignments for the identity (least privilege) ---------------------------------------
step "role assignments for the identity"
assign_role() {  # assign_role ROLE SCOPE
    az_run role assignment create --assignee-object-id "$principal_id" --assignee-principal-type ServicePrincipal \
        --role "$1" --scope "$2" --output none
}
assign_role "Azure Service Bus Data Sender" "$servicebus_id"
assign_role "Azure Service Bus Data Receiver" "$servicebus_id"
assign_role "Storage Blob Data Owner" "$storage_id"
assign_role "Storage Queue Data Contributor" "$storage_id"
assign_role "Storage Table Data Contributor" "$storage_id"
assign_role "Key Vault Secrets User" "$vault_id"
assign_role "Monitoring Metrics Publisher" "$insights_id"

# --- 9. secrets (only those given; values go through stdin, never the command line or the output) -
secret_settings=()
secrets_given=()
if [[ -n "${RABBITMQ_URL:-}" ]]; then
    secrets_given+=("RABBITMQ_URL:rabbitmq-url")
fi
if [[ -n "${INTEGRATION_MANAGER_TOKEN:-}" ]]; then
    secrets_given+=("INTEGRATION_MANAGER_TOKEN:integration-manager-token")
fi
if ((${#secrets_given[@]})); then
    step "Key Vault secrets"
    if [[ -n "${DEPLOYER_OBJECT_ID:-}" ]]; then
        deployer_id="$DEPLOYER_OBJECT_ID"
    else
        az_value deployer_id '<deployer-object-id>' ad signed-in-user show --query id --output tsv
    fi
    az_run role assignment create --assignee-object-id "$deployer_id" \
        --assignee-principal-type "$DEPLOYER_PRINCIPAL_TYPE" --role "Key Vault Secrets Officer" \
        --scope "$vault_id" --output none
    for entry in "${secrets_given[@]}"; do
        env_name="${entry%%:*}"
        secret_name="${entry#*:}"
        secret_args=(keyvault secret set --vault-name "$KEY_VAULT" --name "$secret_name" --file /dev/stdin
            --encoding utf-8 --content-type text/plain --output none)
        note "secret $secret_name = \$$env_name, piped on stdin (never printed)"
        if ((dry_run)); then
            az_run "${secret_args[@]}"
        else
            # A new role assignment takes a few minutes to reach Key Vault: retry while it answers 403.
            printf 'deploy: + %s\n' "$(command_line "${secret_args[@]}")" >&2
            errors="$(mktemp)"
            for attempt in $(seq 1 20); do
                if printf '%s' "${!env_name}" | "$az_bin" "${secret_args[@]}" 2>"$errors"; then
                    break
                fi
                if ((attempt == 20)) || ! grep -qiE 'forbidden|not authorized|does not have' "$errors"; then
                    cat "$errors" >&2
                    rm -f "$errors"
                    die "could not set secret $secret_name in $KEY_VAULT"
                fi
                note "waiting for the Key Vault role assignment to take effect (attempt $attempt)"
                sleep 15
            done
            rm -f "$errors"
        fi
        secret_settings+=("$env_name=@Microsoft.KeyVault(SecretUri=${vault_uri}secrets/$secret_name/)")
    done
else
    note "RABBITMQ_URL and INTEGRATION_MANAGER_TOKEN not given: secrets and their app settings left as they are"
fi

# --- 10. function app -----------------------------------------------------------------------------
step "function app (Flex Consumption, Python $PYTHON_RUNTIME_VERSION, user-assigned identity)"
if az_exists functionapp show --name "$APP_NAME" --resource-group "$RESOURCE_GROUP" --output none; then
    note "function app $APP_NAME exists"
else
    note "when the function app is missing:"
    az_run functionapp create --name "$APP_NAME" --resource-group "$RESOURCE_GROUP" \
        --storage-account "$STORAGE_ACCOUNT" --flexconsumption-location "$LOCATION" \
        --runtime python --runtime-version "$PYTHON_RUNTIME_VERSION" --instance-memory "$INSTANCE_MEMORY_MB" \
        --maximum-instance-count "$MAXIMUM_INSTANCE_COUNT" --assign-identity "$identity_id" \
        --deployment-storage-name "$STORAGE_ACCOUNT" --deployment-storage-container-name "$DEPLOYMENT_CONTAINER" \
        --deployment-storage-auth-type UserAssignedIdentity --deployment-storage-auth-value "$identity_id" \
        --disable-app-insights true --https-only true --tags "${tags[@]}" --output none
fi
# The instance size and cap of an existing app too.
az_run functionapp scale config set --name "$APP_NAME" --resource-group "$RESOURCE_GROUP" \
    --instance-memory "$INSTANCE_MEMORY_MB" --maximum-instance-count "$MAXIMUM_INSTANCE_COUNT" --output none
# Converge an existing app too: the identity, and deployment storage reached with it (not a key).
az_run functionapp identity assign --name "$APP_NAME" --resource-group "$RESOURCE_GROUP" \
    --identities "$identity_id" --output none
az_run functionapp deployment config set --name "$APP_NAME" --resource-group "$RESOURCE_GROUP" \
    --deployment-storage-name "$STORAGE_ACCOUNT" --deployment-storage-container-name "$DEPLOYMENT_CONTAINER" \
    --deployment-storage-auth-type UserAssignedIdentity --deployment-storage-auth-value "$identity_id" --output none
az_run functionapp update --name "$APP_NAME" --resource-group "$RESOURCE_GROUP" \
    --set "keyVaultReferenceIdentity=$identity_id" --output none

# --- 11. application settings ---------------------------------------------------------------------
step "application settings (identity-based connections; no keys or connection strings)"
settings=(
    "AzureWebJobsStorage__accountName=$STORAGE_ACCOUNT"
    "AzureWebJobsStorage__credential=managedidentity"
    "AzureWebJobsStorage__clientId=$client_id"
    "ServiceBusConnection__fullyQualifiedNamespace=$SERVICEBUS_NAMESPACE.servicebus.windows.net"
    "ServiceBusConnection__credential=managedidentity"
    "ServiceBusConnection__clientId=$client_id"
    "AZURE_CLIENT_ID=$client_id"
    "APPLICATIONINSIGHTS_CONNECTION_STRING=$insights_connection_string"
    "APPLICATIONINSIGHTS_AUTHENTICATION_STRING=ClientId=$client_id;Authorization=AAD"
    # The Python worker configures Azure Monitor OpenTelemetry itself (azure-monitor-opentelemetry in
    # requirements.txt): the app's log fields arrive as customDimensions (docs/operations.md).
    "PYTHON_APPLICATIONINSIGHTS_ENABLE_TELEMETRY=true"
    "COSMOS_ENDPOINT=$cosmos_endpoint"
    "COSMOS_DATABASE=$COSMOS_DATABASE"
    "COSMOS_CONNECTIONS_CONTAINER=$COSMOS_CONNECTIONS_CONTAINER"
    "COSMOS_STATE_CONTAINER=$COSMOS_STATE_CONTAINER"
    "TOKEN_REFRESH_INTERVAL_MS=$TOKEN_REFRESH_INTERVAL_MS"
    "TOKEN_REFRESH_EXPIRATION_THRESHOLD_MS=$TOKEN_REFRESH_EXPIRATION_THRESHOLD_MS"
    "TOKEN_REFRESH_MAX_DELIVERY_COUNT=$TOKEN_REFRESH_MAX_DELIVERY_COUNT"
    "RABBITMQ_EXCHANGE=$RABBITMQ_EXCHANGE"
    # A worker thread for each message the Service Bus trigger hands over at once (docs/deploy.md).
    "PYTHON_THREADPOOL_THREAD_COUNT=$PYTHON_THREADPOOL_THREAD_COUNT"
)
for name in "${passthrough_settings[@]}"; do
    if [[ -n "${!name:-}" ]]; then
        settings+=("$name=${!name}")
    fi
done
if [[ -n "$INTEGRATION_MANAGER_URL" ]]; then
    settings+=("INTEGRATION_MANAGER_URL=$INTEGRATION_MANAGER_URL")
else
    az_value current_manager_url '' functionapp config appsettings list --name "$APP_NAME" \
        --resource-group "$RESOURCE_GROUP" --query "[?name=='INTEGRATION_MANAGER_URL'].value | [0]" --output tsv
    if [[ -z "$current_manager_url" ]]; then
        warn "INTEGRATION_MANAGER_URL not given and not set on the app: using $PLACEHOLDER_MANAGER_URL;" \
            "every refresh fails (network_error) until you set the real one"
        note "no INTEGRATION_MANAGER_URL on the app: the placeholder $PLACEHOLDER_MANAGER_URL is set"
        settings+=("INTEGRATION_MANAGER_URL=$PLACEHOLDER_MANAGER_URL")
    fi
fi
settings+=("${secret_settings[@]}")
az_run functionapp config appsettings set --name "$APP_NAME" --resource-group "$RESOURCE_GROUP" \
    --settings "${settings[@]}" --output none
# Key-based settings that `functionapp create` writes or an earlier setup may have left. The app
# refuses ServiceBusConnection together with ServiceBusConnection__fullyQualifiedNamespace.
az_run functionapp config appsettings delete --name "$APP_NAME" --resource-group "$RESOURCE_GROUP" \
    --setting-names AzureWebJobsStorage DEPLOYMENT_STORAGE_CONNECTION_STRING ServiceBusConnection COSMOS_KEY \
    APPINSIGHTS_INSTRUMENTATIONKEY --output none

# --- 12. metrics and logs into Log Analytics, alerts ----------------------------------------------
step "diagnostic settings: Service Bus and function app metrics (and Service Bus logs) to $LOG_ANALYTICS_WORKSPACE"
# Into AzureMetrics, which the queries of docs/operations.md read (DeadletteredMessages, ActiveMessages, Size...).
# The function app sends metrics only: its logs already reach the workspace through Application Insights. The
# Cosmos account is the platform's: its diagnostic settings are left to its owners.
all_metrics='[{"category":"AllMetrics","enabled":true}]'
az_run monitor diagnostic-settings create --name "$APP_NAME-to-logs" --resource "$servicebus_id" \
    --workspace "$workspace_id" --metrics "$all_metrics" --logs '[{"categoryGroup":"allLogs","enabled":true}]' \
    --output none
az_run monitor diagnostic-settings create --name "$APP_NAME-to-logs" --resource "$functionapp_id" \
    --workspace "$workspace_id" --metrics "$all_metrics" --output none

step "alerts (docs/operations.md: Alerts), sent to ${ACTION_GROUP:-${ALERT_EMAIL:+a new action group $APP_NAME-alerts}}"
if [[ -n "$ACTION_GROUP" ]]; then
    # An action group the operator already routes (e-mail, SMS, a pager, a webhook): taken as it is.
    if [[ "$ACTION_GROUP" == /* ]]; then
        action_group_id="$ACTION_GROUP"
    else
        action_group_id="$(arm_id "$RESOURCE_GROUP" Microsoft.Insights/actionGroups "$ACTION_GROUP")"
    fi
    az_lookup known_action_group monitor action-group show --ids "$action_group_id" --query name --output tsv
    ((dry_run)) || [[ -n "$known_action_group" ]] \
        || die "ACTION_GROUP: no action group $action_group_id; create it first or name an existing one"
elif [[ -n "$ALERT_EMAIL" ]]; then
    action_group_id="$(arm_id "$RESOURCE_GROUP" Microsoft.Insights/actionGroups "$APP_NAME-alerts")"
    short_name="$(printf '%s' "$app_alnum" | cut -c1-12)"
    az_run monitor action-group create --name "$APP_NAME-alerts" --resource-group "$RESOURCE_GROUP" \
        --short-name "${short_name:-tokenrefresh}" --action email on-call "$ALERT_EMAIL" --tags "${tags[@]}" \
        --output none
else
    action_group_id=""
    note "neither ACTION_GROUP nor ALERT_EMAIL given: the alerts fire in the portal only (no action group)"
fi
alert_action=()
[[ -z "$action_group_id" ]] || alert_action=(--action "$action_group_id")
az_run monitor metrics alert create --name "$APP_NAME-dead-letters" --resource-group "$RESOURCE_GROUP" \
    --scopes "$servicebus_id" --condition "max DeadletteredMessages > 0 where EntityName includes *" \
    --window-size 15m --evaluation-frequency 5m --severity 2 --auto-mitigate true \
    --description "A message of $APP_NAME was dead-lettered: see docs/operations.md (A message was dead-lettered)" \
    "${alert_action[@]}" --output none
# An outcome queue that fills up fails every send, and with it every refresh: warn at 80% of its size, long before.
filling_bytes=$((OUTCOME_QUEUE_MAX_SIZE_MB * 1024 * 1024 / 10 * 8))
az_run monitor metrics alert create --name "$APP_NAME-outcome-queue-filling" --resource-group "$RESOURCE_GROUP" \
    --scopes "$servicebus_id" --condition "max Size > $filling_bytes where EntityName includes ${outcome_queues// / or }" \
    --window-size 1h --evaluation-frequency 15m --severity 2 --auto-mitigate true \
    --description "An outcome queue of $APP_NAME is 80% full: see docs/operations.md (Alerts)" \
    "${alert_action[@]}" --output none

# json_string TEXT: TEXT as a JSON string (the texts here are the script's own queries, names and descriptions).
json_string() {
    local text="${1//\\/\\\\}"
    text="${text//\"/\\\"}"
    text="${text//$'\n'/\\n}"
    printf '"%s"' "${text//$'\t'/\\t}"
}
# log_alert NAME SEVERITY LOOKBACK_MINUTES DESCRIPTION QUERY: a log search alert on the app's log lines in
# Application Insights (`traces`) that fires while QUERY, run over the last LOOKBACK_MINUTES, returns a row. The core
# CLI has no command for these rules (`az monitor scheduled-query` is an extension), so each is the ARM resource
# itself, created or updated in place. The query bounds its own time; the rule's window is the smallest that Azure
# offers and that covers it.
log_alert() {
    local window window_size frequency=PT5M groups="[]" query body
    for window in 5 10 15 30 45 60 120 180 240 300 360 1440 2880; do
        ((window >= $3)) && break
    done
    if ((window % 60 == 0)); then window_size="PT$((window / 60))H"; else window_size="PT${window}M"; fi
    ((window <= 360)) || frequency=PT1H
    [[ -z "$action_group_id" ]] || groups="[$(json_string "$action_group_id")]"
    query="traces"$'\n'"| where timestamp > ago($3m)"$'\n'"| $5"
    body="$(printf '{"location":"%s","kind":"LogAlert","tags":{"app":"%s","managed-by":"scripts/deploy.sh"},' \
        "$LOCATION" "$APP_NAME")"
    body+="$(printf '"properties":{"displayName":"%s","description":%s,"severity":%d,"enabled":true,"scopes":["%s"],' \
        "$1" "$(json_string "$4")" "$2" "$insights_id")"
    body+="$(printf '"windowSize":"%s","evaluationFrequency":"%s","criteria":{"allOf":[{"query":%s,' \
        "$window_size" "$frequency" "$(json_string "$query")")"
    body+='"timeAggregation":"Count","operator":"GreaterThan","threshold":0,'
    body+='"failingPeriods":{"numberOfEvaluationPeriods":1,"minFailingPeriodsToAlert":1}}]},'
    body+="$(printf '"autoMitigate":true,"actions":{"actionGroups":%s}}}' "$groups")"
    az_run resource create --resource-group "$RESOURCE_GROUP" --name "$1" \
        --resource-type Microsoft.Insights/scheduledQueryRules --api-version 2021-08-01 --is-full-object \
        --properties "$body" --output none
}
# The timer ticks every minute, so a check runs at most once a minute whatever the interval. Application Insights
# shows a line a few minutes after it is logged: 10 minutes of slack for that.
interval_minutes=$(((10#$TOKEN_REFRESH_INTERVAL_MS + 59999) / 60000))
see_alerts=" See docs/operations.md (Alerts)."
log_alert "$APP_NAME-systemic-failure" 1 15 \
    "Many connections failed the same way (not their fault): fix what the line names.$see_alerts" \
    'where tostring(customDimensions.alarm) == "systemic_failure" | project timestamp, message'
backlog_minutes=$((interval_minutes + 10 > 2880 ? 2880 : interval_minutes + 10))
log_alert "$APP_NAME-refresh-backlog" 2 "$backlog_minutes" \
    "The rate limit of an integration is too low for its wave: tokens are refreshed after they expire.$see_alerts" \
    'where tostring(customDimensions.alarm) == "refresh_backlog" | project timestamp, message'
missed_minutes=$((2 * interval_minutes + 10))
if ((missed_minutes <= 2880)); then
    log_alert "$APP_NAME-check-missed" 1 "$missed_minutes" \
        "No check ran to its end for two intervals: tokens are not being refreshed.$see_alerts" \
        'where message startswith "Check-expiring run finished" | summarize runs = count() | where runs == 0'
else
    warn "TOKEN_REFRESH_INTERVAL_MS is over a day: no alert on missed checks (log search alerts look back 2 days)"
fi
log_alert "$APP_NAME-retryable-failures" 2 60 \
    "$RETRYABLE_FAILURE_ALERT_PERCENT% or more refreshes in an hour failed, not by the connection.$see_alerts" \
    "where message startswith \"OAuth tokens refreshed successfully\"
    or message startswith \"OAuth token refresh failed\"
| summarize outcomes = count(), retryable = countif(message contains_cs \"retryable=True\")
| where retryable >= 5 and retryable * 100 >= outcomes * $RETRYABLE_FAILURE_ALERT_PERCENT"

# --- 13. code -------------------------------------------------------------------------------------
step "publish the code (remote build installs requirements.txt)"
if ((dry_run)); then
    note "build $(quote "$DEPLOY_ZIP") from the allowlist: host.json, requirements.txt and the git-tracked" \
        "*.py and function.json files of the function folders and shared/ (scripts/deploy.sh --package FILE)"
else
    build_package "$DEPLOY_ZIP"
fi
az_run functionapp deployment source config-zip --name "$APP_NAME" --resource-group "$RESOURCE_GROUP" \
    --src "$DEPLOY_ZIP" --build-remote true --timeout 900 --output none

if ((dry_run)); then
    note "dry run: nothing was changed"
else
    note "deployed $APP_NAME; the host restarts and its first timer tick runs a check." \
        "Logs: Application Insights $APP_INSIGHTS (docs/operations.md: Runbook)"
fi
