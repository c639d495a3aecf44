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
queues of localdev/service_bus_queues.json, Log Analytics + Application Insights, a user-assigned
managed identity and its role assignments, a Key Vault, a Flex Consumption function app (Python 3.13)
with identity-based connections and no keys in its settings, the Cosmos DB state container in the
existing COSMOS_ACCOUNT, and an alert on dead-lettered messages; then publishes the code (a zip of
host.json, requirements.txt, the function folders and shared/: the files git tracks; remote build).
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
  MAXIMUM_INSTANCE_COUNT                 Flex Consumption scale-out limit (platform default)
  PYTHON_RUNTIME_VERSION                 3.11, 3.12 or 3.13 (3.13: requirements.txt pins its worker to
                                         the version the real-worker tests run)
  TOKEN_REFRESH_INTERVAL_MS              (3600000)
  TOKEN_REFRESH_EXPIRATION_THRESHOLD_MS  (3900000)
  TOKEN_REFRESH_MAX_DELIVERY_COUNT       also the refresh queue's max delivery count (10)
  DUPLICATE_DETECTION_WINDOW             the refresh queue's duplicate detection history window, an ISO 8601
                                         duration from PT20S to P7D (the queue file's, PT2H)
  RABBITMQ_EXCHANGE                      (integration.events)
  INTEGRATION_MANAGER_URL                base URL of integration-manager; when not given the app keeps
                                         its current value, or gets https://integration-manager.invalid
  RABBITMQ_URL, INTEGRATION_MANAGER_TOKEN
                                         secrets: stored in the Key Vault (never printed) and referenced
                                         from the app settings; when not given, left as they are
  ALERT_EMAIL                            e-mail for the dead-letter alert (no action group without it)
  DEPLOYER_OBJECT_ID, DEPLOYER_PRINCIPAL_TYPE
                                         who may write the secrets (the signed-in user, User)
  AZURE_CLI                              the az executable (az)
  PYTHON                                 the python3 that reads the queue file and builds the zip (python3)
  DEPLOY_ZIP, DEPLOYMENT_CONTAINER       the zip built (.local/deploy/APP_NAME.zip) and the blob
                                         container Flex Consumption deploys from (app-package)
  TOKEN_REFRESH_ENABLED, TOKEN_REFRESH_SKIP_STATUSES, TOKEN_REFRESH_PAGE_SIZE,
  TOKEN_REFRESH_FAILURE_COOLDOWN_MS, TOKEN_REFRESH_CLAIM_LEASE_MS, TOKEN_REFRESH_MAX_AGE_MS,
  TOKEN_REFRESH_RETRY_DELAY_MS, TOKEN_REFRESH_RATE_LIMITS, TOKEN_REFRESH_SPREAD_MS,
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

# --- settings -------------------------------------------------------------------------------------
missing=()
for name in RESOURCE_GROUP LOCATION APP_NAME COSMOS_ACCOUNT; do
    [[ -n "${!name:-}" ]] || missing+=("$name")
done
((${#missing[@]} == 0)) || usage_error "missing required environment variable(s): ${missing[*]}"

[[ "$APP_NAME" =~ ^[A-Za-z0-9][A-Za-z0-9-]{0,58}[A-Za-z0-9]$ ]] \
    || usage_error "APP_NAME must be 2-60 letters, digits and hyphens, starting and ending with a letter or digit"

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
MAXIMUM_INSTANCE_COUNT="${MAXIMUM_INSTANCE_COUNT:-}"
PYTHON_RUNTIME_VERSION="${PYTHON_RUNTIME_VERSION:-3.13}"
TOKEN_REFRESH_INTERVAL_MS="${TOKEN_REFRESH_INTERVAL_MS:-3600000}"
TOKEN_REFRESH_EXPIRATION_THRESHOLD_MS="${TOKEN_REFRESH_EXPIRATION_THRESHOLD_MS:-3900000}"
TOKEN_REFRESH_MAX_DELIVERY_COUNT="${TOKEN_REFRESH_MAX_DELIVERY_COUNT:-10}"
DUPLICATE_DETECTION_WINDOW="${DUPLICATE_DETECTION_WINDOW:-}"  # empty: the queue file's window
RABBITMQ_EXCHANGE="${RABBITMQ_EXCHANGE:-integration.events}"
INTEGRATION_MANAGER_URL="${INTEGRATION_MANAGER_URL:-}"
ALERT_EMAIL="${ALERT_EMAIL:-}"
DEPLOYER_PRINCIPAL_TYPE="${DEPLOYER_PRINCIPAL_TYPE:-User}"
DEPLOY_ZIP="${DEPLOY_ZIP:-$repo_root/.local/deploy/$APP_NAME.zip}"
PLACEHOLDER_MANAGER_URL="https://integration-manager.invalid"

for name in TOKEN_REFRESH_INTERVAL_MS TOKEN_REFRESH_EXPIRATION_THRESHOLD_MS TOKEN_REFRESH_MAX_DELIVERY_COUNT \
    INSTANCE_MEMORY_MB; do
    [[ "${!name}" =~ ^[0-9]+$ ]] || usage_error "$name must be a whole number"
done
[[ "$PYTHON_RUNTIME_VERSION" =~ ^3\.1[1-3]$ ]] \
    || usage_error "PYTHON_RUNTIME_VERSION must be 3.11, 3.12 or 3.13 (3.13 runs the worker version the tests pin)"
[[ -z "$MAXIMUM_INSTANCE_COUNT" || "$MAXIMUM_INSTANCE_COUNT" =~ ^[0-9]+$ ]] \
    || usage_error "MAXIMUM_INSTANCE_COUNT must be a whole number"
((TOKEN_REFRESH_MAX_DELIVERY_COUNT >= 1 && TOKEN_REFRESH_MAX_DELIVERY_COUNT <= 100)) \
    || usage_error "TOKEN_REFRESH_MAX_DELIVERY_COUNT must be between 1 and 100 (the queue's limit is 2000, the app's 100)"
[[ ${#STORAGE_ACCOUNT} -ge 3 && "$STORAGE_ACCOUNT" =~ ^[a-z0-9]+$ ]] \
    || usage_error "STORAGE_ACCOUNT must be 3-24 lowercase letters and digits"
[[ "$SERVICEBUS_NAMESPACE" =~ ^[A-Za-z][A-Za-z0-9-]{4,48}[A-Za-z0-9]$ && "$SERVICEBUS_NAMESPACE" != *-sb \
    && "$SERVICEBUS_NAMESPACE" != *-mgmt ]] \
    || usage_error "SERVICEBUS_NAMESPACE must have 6-50 letters, digits and hyphens, start with a letter and not end" \
        "with -sb or -mgmt (set it when APP_NAME starts with a digit)"
# iso_seconds DURATION: the seconds of an ISO 8601 duration in days, hours, minutes and seconds (P1D, PT2H,
# P1DT12H, PT90S); fails for any other form.
iso_seconds() {
    [[ "$1" =~ ^P([0-9]{1,6}D)?(T([0-9]{1,9}H)?([0-9]{1,9}M)?([0-9]{1,9}S)?)?$ && "$1" != P && "$1" != *T ]] \
        || return 1
    local days="${BASH_REMATCH[1]%D}" hours="${BASH_REMATCH[3]%H}" minutes="${BASH_REMATCH[4]%M}"
    local seconds="${BASH_REMATCH[5]%S}"
    printf '%s' $((10#${days:-0} * 86400 + 10#${hours:-0} * 3600 + 10#${minutes:-0} * 60 + 10#${seconds:-0}))
}
if [[ -n "$DUPLICATE_DETECTION_WINDOW" ]]; then
    # Service Bus keeps a duplicate detection history of 20 seconds to 7 days.
    window_seconds="$(iso_seconds "$DUPLICATE_DETECTION_WINDOW")" \
        && ((window_seconds >= 20 && window_seconds <= 604800)) \
        || usage_error "DUPLICATE_DETECTION_WINDOW must be an ISO 8601 duration from PT20S to P7D, like PT2H or" \
            "P1DT12H (got $(printf '%q' "$DUPLICATE_DETECTION_WINDOW"))"
fi
if ((TOKEN_REFRESH_EXPIRATION_THRESHOLD_MS < TOKEN_REFRESH_INTERVAL_MS + 300000)); then
    warn "TOKEN_REFRESH_EXPIRATION_THRESHOLD_MS is shorter than TOKEN_REFRESH_INTERVAL_MS + 5 min:" \
        "a token can expire between two checks"
fi

# Application settings copied from the environment when set (else the app's own default applies).
passthrough_settings=(
    TOKEN_REFRESH_ENABLED TOKEN_REFRESH_SKIP_STATUSES TOKEN_REFRESH_PAGE_SIZE
    TOKEN_REFRESH_FAILURE_COOLDOWN_MS TOKEN_REFRESH_CLAIM_LEASE_MS TOKEN_REFRESH_MAX_AGE_MS TOKEN_REFRESH_RETRY_DELAY_MS
    TOKEN_REFRESH_RATE_LIMITS TOKEN_REFRESH_SPREAD_MS
    INTEGRATION_MANAGER_CONNECT_TIMEOUT_MS INTEGRATION_MANAGER_TIMEOUT_MS INTEGRATION_MANAGER_MAX_ATTEMPTS
    INTEGRATION_MANAGER_BACKOFF_INITIAL_MS INTEGRATION_MANAGER_RETRY_BUDGET_MS INTEGRATION_MANAGER_IN_FLIGHT_MS
)

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

if ((!dry_run)); then
    command -v "$az_bin" >/dev/null 2>&1 || die "the Azure CLI ($az_bin) is not on PATH; see docs/deploy.md"
fi

# --- the Service Bus queues: localdev/service_bus_queues.json -------------------------------------
# The one list of the app's queues and their properties (the Service Bus model the tests and the local
# host run on reads it too). Each line of queue_plan: the tab-separated `az servicebus queue create`
# arguments of one queue after the resource group and namespace, with the overrides for the refresh
# queue: maxDeliveryCount = TOKEN_REFRESH_MAX_DELIVERY_COUNT, duplicateDetectionHistoryTimeWindow =
# DUPLICATE_DETECTION_WINDOW (when set).
queue_file="$repo_root/localdev/service_bus_queues.json"
refresh_queue=integration.token.refresh-requested
command -v "$python" >/dev/null 2>&1 || die "reading $queue_file needs python3 (or PYTHON=...)"
queue_plan="$("$python" - "$queue_file" "$refresh_queue" "$TOKEN_REFRESH_MAX_DELIVERY_COUNT" \
    "$DUPLICATE_DETECTION_WINDOW" <<'PY'
import json
import re
import sys

path, refresh_queue, max_delivery_count, window = sys.argv[1:]
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
    print("\t".join(args))
PY
)"

# Values read from Azure by az_value (placeholders in a dry run).
subscription_id="" principal_id="" client_id="" insights_connection_string="" cosmos_endpoint=""
deployer_id="" current_manager_url="" existing_sessions=""

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
action_group_id="$(arm_id "$RESOURCE_GROUP" Microsoft.Insights/actionGroups "$APP_NAME-alerts")"
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
step "Cosmos DB: endpoint, the app's state container, data-plane role"
az_value cosmos_endpoint '<cosmos-document-endpoint>' cosmosdb show --name "$COSMOS_ACCOUNT" \
    --resource-group "$COSMOS_RESOURCE_GROUP" --query documentEndpoint --output tsv
if az_exists cosmosdb sql container show --account-name "$COSMOS_ACCOUNT" --resource-group "$COSMOS_RESOURCE_GROUP" \
    --database-name "$COSMOS_DATABASE" --name "$COSMOS_STATE_CONTAINER" --output none; then
    note "state container $COSMOS_STATE_CONTAINER exists"
else
    note "when the state container is missing:"
    az_run cosmosdb sql container create --account-name "$COSMOS_ACCOUNT" \
        --resource-group "$COSMOS_RESOURCE_GROUP" --database-name "$COSMOS_DATABASE" \
        --name "$COSMOS_STATE_CONTAINER" --partition-key-path /id --ttl -1 --output none
fi
# Cosmos DB Built-in Data Contributor (data plane only: the app cannot change the account or containers).
cosmos_role_definition=00000000-0000-0000-0000-000000000002
az_run cosmosdb sql role assignment create --account-name "$COSMOS_ACCOUNT" \
    --resource-group "$COSMOS_RESOURCE_GROUP" --scope / --principal-id "$principal_id" \
    --role-definition-id "$cosmos_role_definition" \
    --role-assignment-id "$(guid_of "$COSMOS_ACCOUNT/$principal_id/$cosmos_role_definition")" --output none

# --- 7. Key Vault ---------------------------------------------------------------------------------
step "Key Vault (RBAC) for RABBITMQ_URL and INTEGRATION_MANAGER_TOKEN"
if az_exists keyvault show --name "$KEY_VAULT" --resource-group "$RESOURCE_GROUP" --output none; then
    note "Key Vault $KEY_VAULT exists"
else
    note "when the Key Vault is missing:"
    az_run keyvault create --name "$KEY_VAULT" --resource-group "$RESOURCE_GROUP" --location "$LOCATION" \
        --enable-rbac-authorization true --retention-days 90 --tags "${tags[@]}" --output none
fi
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
    create_args=(functionapp create --name "$APP_NAME" --resource-group "$RESOURCE_GROUP"
        --storage-account "$STORAGE_ACCOUNT" --flexconsumption-location "$LOCATION"
        --runtime python --runtime-version "$PYTHON_RUNTIME_VERSION" --instance-memory "$INSTANCE_MEMORY_MB")
    if [[ -n "$MAXIMUM_INSTANCE_COUNT" ]]; then
        create_args+=(--maximum-instance-count "$MAXIMUM_INSTANCE_COUNT")
    fi
    create_args+=(--assign-identity "$identity_id"
        --deployment-storage-name "$STORAGE_ACCOUNT" --deployment-storage-container-name "$DEPLOYMENT_CONTAINER"
        --deployment-storage-auth-type UserAssignedIdentity --deployment-storage-auth-value "$identity_id"
        --disable-app-insights true --https-only true --tags "${tags[@]}" --output none)
    az_run "${create_args[@]}"
fi
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

# --- 12. alert on dead-lettered messages ----------------------------------------------------------
step "alert: messages in a dead-letter queue of $SERVICEBUS_NAMESPACE"
alert_args=(monitor metrics alert create --name "$APP_NAME-dead-letters" --resource-group "$RESOURCE_GROUP"
    --scopes "$servicebus_id" --condition "max DeadletteredMessages > 0 where EntityName includes *"
    --window-size 15m --evaluation-frequency 5m --severity 2 --auto-mitigate true
    --description "A message of $APP_NAME was dead-lettered: see docs/operations.md (A message was dead-lettered)")
if [[ -n "$ALERT_EMAIL" ]]; then
    short_name="$(printf '%s' "$app_alnum" | cut -c1-12)"
    az_run monitor action-group create --name "$APP_NAME-alerts" --resource-group "$RESOURCE_GROUP" \
        --short-name "${short_name:-tokenrefresh}" --action email on-call "$ALERT_EMAIL" --tags "${tags[@]}" \
        --output none
    alert_args+=(--action "$action_group_id")
else
    note "ALERT_EMAIL not given: the alert fires in the portal only (no action group)"
fi
az_run "${alert_args[@]}" --output none

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
