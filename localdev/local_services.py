"""Start and stop the real local services that tests, ``make demo`` and developers use.

This module is the one place that knows how to run them on a machine without Docker:

* :class:`RabbitMQ` - an isolated ``rabbitmq-server`` node (Debian package) with its own data/log
  directories, Erlang cookie and a private ``epmd``, all on free ports bound to 127.0.0.1.
* :class:`CosmosServer` - ``@vercel/cosmosdb-server`` (npm) via ``localdev/cosmos_server.js``, which turns
  HTTP keep-alive on (the package's own CLI closes every connection and is ~20x slower).
* :class:`Azurite` - the Azure Storage emulator (npm) for ``AzureWebJobsStorage``.

Every server runs as a child process in its own session (process group) with stdout/stderr going to
a log file under ``base_dir``. Readiness is checked on the wire (a port that answers, for RabbitMQ an
AMQP handshake), and ``stop()`` returns only once the ports are closed: PID 1 on these machines does
not reap orphans, so a stopped server may linger as a zombie that ``kill -0`` still reports alive.

Command line (servers keep running after the command returns)::

    python -m localdev.local_services start  [--state-dir DIR]   # writes DIR/services.json (+ services.env)
    python -m localdev.local_services status [--state-dir DIR]
    python -m localdev.local_services stop   [--state-dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

__all__ = [
    "AZURITE_ACCOUNT_KEY",
    "AZURITE_ACCOUNT_NAME",
    "COSMOS_EMULATOR_KEY",
    "Azurite",
    "CosmosServer",
    "RabbitMQ",
    "ServiceStartError",
    "free_port",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
RABBITMQ_BIN_DIR = Path("/usr/lib/rabbitmq/bin")
NODE_MODULES = REPO_ROOT / "node_modules"
DEFAULT_STATE_DIR = REPO_ROOT / ".local" / "services"

# Well-known, public development keys (documented by Microsoft for the emulators); not secrets.
COSMOS_EMULATOR_KEY = "C2y6yDjf5/R+ob0N8A7Cgv30VRDJIWEHLM+4QDU9DE2nQ9nDuVTqobD4b8mGGyPMbIZnqyMsEcaGQy67XIw/Jw=="
AZURITE_ACCOUNT_NAME = "devstoreaccount1"
AZURITE_ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="

_STOP_TIMEOUT = 30.0
_PORT_CLOSE_TIMEOUT = 15.0
_LOG_TAIL_LINES = 60


class ServiceStartError(RuntimeError):
    """A local service did not start; the message carries the tail of its log."""


class ServiceStopError(RuntimeError):
    """A local service did not stop: one of its ports still answers."""


# --------------------------------------------------------------------------------------------------
# Ports


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = (int(v) for v in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return low, high


def _free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports on 127.0.0.1, chosen OUTSIDE the kernel's ephemeral range:
    a port from that range can be taken by any outgoing connection between our probe and the
    server's bind (seen: RabbitMQ's distribution port lost that race under load)."""
    low, _ = _ephemeral_range()
    candidates = list(range(10_000, max(10_000 + count, low)))
    random.shuffle(candidates)
    sockets: list[socket.socket] = []
    try:
        for port in candidates:
            if len(sockets) == count:
                break
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.bind((HOST, port))
            except OSError:
                sock.close()
                continue
            sockets.append(sock)
        if len(sockets) < count:
            raise ServiceStartError(f"no {count} free ports between 10000 and {low}")
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    return _free_ports(1)[0]


def _port_open(port: int, timeout: float = 0.25) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:port."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout):
            return True
    except OSError:
        return False


def _wait_ports_closed(ports: Iterable[int], timeout: float) -> list[int]:
    """Wait until none of ``ports`` accepts connections; returns those still open at the deadline."""
    deadline = time.monotonic() + timeout
    still_open = [port for port in ports if _port_open(port)]
    while still_open and time.monotonic() < deadline:
        time.sleep(0.05)
        still_open = [port for port in still_open if _port_open(port)]
    return still_open


def _amqp_answers(port: int, timeout: float = 1.0) -> bool:
    """Whether an AMQP 0-9-1 broker on the port answers the protocol header with Connection.Start."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as sock:
            sock.sendall(b"AMQP\x00\x00\x09\x01")
            data = b""
            while len(data) < 11:
                chunk = sock.recv(11 - len(data))
                if not chunk:
                    return False
                data += chunk
    except OSError:
        return False
    frame_type, channel, _size, class_id, method_id = struct.unpack(">BHIHH", data)
    return (frame_type, channel, class_id, method_id) == (1, 0, 10, 10)


# --------------------------------------------------------------------------------------------------
# Processes


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks) of a process from /proc, or None when it does not exist."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[19])


class _Child:
    """A server process in its own session, identified by pid + start time (safe against pid reuse)."""

    def __init__(self, pid: int, start_ticks: int | None, popen: subprocess.Popen[bytes] | None = None):
        self.pid = pid
        self.start_ticks = start_ticks
        self.popen = popen

    @classmethod
    def spawn(cls, args: list[str], *, log_path: Path, env: dict[str, str], cwd: Path | None = None) -> _Child:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%S')} {shlex.join(args)}\n".encode())
            log.flush()
            popen = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                start_new_session=True,  # own process group; survives the parent (detached CLI mode)
            )
        stat = _proc_stat(popen.pid)
        return cls(popen.pid, stat[1] if stat else None, popen)

    @classmethod
    def from_state(cls, state: dict[str, Any] | None) -> _Child | None:
        if not state:
            return None
        return cls(int(state["pid"]), state.get("start_ticks"))

    def state(self) -> dict[str, Any]:
        return {"pid": self.pid, "start_ticks": self.start_ticks}

    def _is_ours(self) -> bool:
        """The pid still names the process we started (running or a zombie)."""
        stat = _proc_stat(self.pid)
        return stat is not None and (self.start_ticks is None or stat[1] == self.start_ticks)

    def running(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        stat = _proc_stat(self.pid)
        return (
            stat is not None and stat[0] not in ("Z", "X") and (self.start_ticks is None or stat[1] == self.start_ticks)
        )

    def returncode(self) -> int | None:
        return self.popen.poll() if self.popen is not None else None

    def send_signal(self, sig: int) -> None:
        if self.running():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def signal_group(self, sig: int) -> None:
        """Signal the whole process group (the leader may be gone while helpers remain)."""
        if self.popen is None and not self._is_ours():
            return  # the group leader's pid may have been reused: do not touch a stranger's group
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def wait(self, timeout: float) -> bool:
        """Wait for the process to exit; True when it did."""
        deadline = time.monotonic() + timeout
        while self.running():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    def stop(self, *, sig: int = signal.SIGTERM, whole_group: bool = True, timeout: float = _STOP_TIMEOUT) -> None:
        """Ask politely, then SIGKILL the group; leaves nothing of the group running."""
        if self.running():
            if whole_group:
                self.signal_group(sig)
            else:
                self.send_signal(sig)
            if not self.wait(timeout):
                self.signal_group(signal.SIGKILL)
                self.wait(5)
        self.signal_group(signal.SIGKILL)  # helpers left in the group (e.g. Erlang's inet_gethost)


def _log_tail(*paths: Path, lines: int = _LOG_TAIL_LINES) -> str:
    parts = []
    for path in paths:
        try:
            text = path.read_text(errors="replace")
        except FileNotFoundError:
            continue
        tail = "\n".join(text.rstrip().splitlines()[-lines:])
        parts.append(f"--- last {lines} lines of {path} ---\n{tail}")
    return "\n".join(parts) if parts else "(no log written)"


def _wait_until_ready(
    name: str,
    child: _Child,
    is_ready: Any,
    timeout: float,
    logs: tuple[Path, ...],
) -> None:
    deadline = time.monotonic() + timeout
    while not is_ready():
        if not child.running():
            code = child.returncode()
            raise ServiceStartError(f"{name} exited during startup (exit code {code})\n{_log_tail(*logs)}")
        if time.monotonic() >= deadline:
            raise ServiceStartError(f"{name} not ready after {timeout:g} s\n{_log_tail(*logs)}")
        time.sleep(0.05)


def _base_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("LC_ALL", "C.UTF-8")
    return env


def _node_executable() -> str:
    node = shutil.which("node")
    if node is None:
        raise ServiceStartError("`node` is not on PATH (Node.js 20+ is needed; see scripts/setup.sh)")
    return node


def _require_npm_package(package: str) -> Path:
    path = NODE_MODULES / package
    if not (path / "package.json").is_file():
        raise ServiceStartError(f"{path} is missing: run `npm ci` in {REPO_ROOT} (or scripts/setup.sh)")
    return path


def _ensure_ports_free(name: str, ports: Iterable[int]) -> None:
    busy = [port for port in ports if _port_open(port)]
    if busy:
        raise ServiceStartError(f"{name}: port(s) {busy} on {HOST} are already in use")


# --------------------------------------------------------------------------------------------------
# RabbitMQ

_APP_DEPS = re.compile(r"\{\s*(?:applications|included_applications|optional_applications)\s*,\s*\[([^\]]*)\]")


def _rabbitmq_release_dir() -> Path | None:
    """The Debian package's release dir (``/usr/lib/rabbitmq/lib/rabbitmq_server-X.Y.Z``), if unambiguous."""
    server = (RABBITMQ_BIN_DIR / "rabbitmq-server").resolve()
    release = server.parent.parent
    if all((release / name).is_dir() for name in ("sbin", "escript", "plugins")):
        return release
    return None


def _make_lean_rabbitmq_home(target: Path) -> Path | None:
    """A RABBITMQ_HOME whose plugins dir links only the apps the broker itself needs.

    ``rabbitmq-server`` puts every app of its plugins dir (~70: management, MQTT, STOMP, federation...)
    on the Erlang code path, and at boot it scans the modules of all loaded apps: with the full set a
    node needs ~7.5 s to boot on these machines, with only the ``rabbit`` app's dependency closure ~3 s.
    Returns None (use the package's own home) when the package layout is not the expected one.
    """
    release = _rabbitmq_release_dir()
    if release is None:
        return None
    apps: dict[str, Path] = {}
    for app_dir in (release / "plugins").iterdir():
        name = app_dir.name.rsplit("-", 1)[0]
        if (app_dir / "ebin" / f"{name}.app").is_file():
            apps[name] = app_dir
    needed: set[str] = set()
    todo = ["rabbit"]
    while todo:
        name = todo.pop()
        if name in needed or name not in apps:
            continue  # already seen, or an OTP application (found in Erlang's own lib dir)
        needed.add(name)
        for deps in _APP_DEPS.findall((apps[name] / "ebin" / f"{name}.app").read_text(errors="replace")):
            todo.extend(dep.strip().strip("'") for dep in deps.split(",") if dep.strip())
    if "rabbit" not in needed:
        return None
    if target.exists():
        shutil.rmtree(target)
    (target / "plugins").mkdir(parents=True)
    (target / "sbin").symlink_to(release / "sbin")
    (target / "escript").symlink_to(release / "escript")
    for name in sorted(needed):
        (target / "plugins" / apps[name].name).symlink_to(apps[name])
    return target


def _stop_child(name: str, child: _Child, ports: list[int]) -> None:
    """Stop a single-process server and wait until its ports are closed (PID 1 does not reap
    orphans, so the port, not the process, tells that it is gone)."""
    child.stop()
    still_open = _wait_ports_closed(ports, _PORT_CLOSE_TIMEOUT)
    if still_open:
        raise ServiceStopError(f"{name}: port(s) {still_open} still open after stop")


class RabbitMQ:
    """An isolated RabbitMQ node: own config, data, logs, Erlang cookie and private epmd."""

    kind: ClassVar[str] = "rabbitmq"

    def __init__(self, base_dir: Path, port: int | None = None):
        self.base_dir = Path(base_dir).resolve()
        ports = _free_ports(3)
        self.port: int = port or ports[0]
        self.dist_port: int = ports[1]
        self.epmd_port: int = ports[2]
        self.node = f"rabbit_{self.port}@localhost"
        self.url: str = f"amqp://guest:guest@{HOST}:{self.port}/%2F"
        self.home_dir = self.base_dir / "home"
        self.log_dir = self.base_dir / "log"
        self.pid_file = self.base_dir / "rabbitmq.pid"
        self.server_log = self.base_dir / "rabbitmq-server.out.log"
        self.node_log = self.log_dir / f"{self.node}.log"
        self.epmd_log = self.base_dir / "epmd.out.log"
        self._server: _Child | None = None
        self._epmd: _Child | None = None

    def __repr__(self) -> str:
        return f"RabbitMQ(url={self.url!r}, node={self.node!r}, base_dir={str(self.base_dir)!r})"

    @property
    def ports(self) -> list[int]:
        return [self.port, self.dist_port, self.epmd_port]

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in _base_env().items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(
            HOME=str(self.home_dir),  # the Erlang cookie lives here
            RABBITMQ_NODENAME=self.node,
            RABBITMQ_NODE_IP_ADDRESS=HOST,
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            ERL_EPMD_PORT=str(self.epmd_port),
            ERL_EPMD_ADDRESS=HOST,
            RABBITMQ_MNESIA_BASE=str(self.base_dir / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.log_dir),
            RABBITMQ_PID_FILE=str(self.pid_file),
            RABBITMQ_CONFIG_FILE=str(self.base_dir / "rabbitmq.conf"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.base_dir / "enabled_plugins"),
            RABBITMQ_CONF_ENV_FILE=str(self.base_dir / "rabbitmq-env.conf"),  # empty: /etc/rabbitmq is not read
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
        )
        lean_home = self.base_dir / "rabbitmq-home"
        if (lean_home / "sbin").is_dir():
            env["RABBITMQ_SCRIPTS_DIR"] = str(lean_home / "sbin")  # rabbitmq-env derives RABBITMQ_HOME from it
        return env

    def _write_config(self) -> None:
        for directory in (self.home_dir, self.log_dir, self.base_dir / "mnesia"):
            directory.mkdir(parents=True, exist_ok=True)
        (self.base_dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = {HOST}:{self.port}\nloopback_users = none\n"
        )
        (self.base_dir / "enabled_plugins").write_text("[].\n")
        (self.base_dir / "rabbitmq-env.conf").write_text("")
        _make_lean_rabbitmq_home(self.base_dir / "rabbitmq-home")

    def start(self, timeout: float = 60) -> None:
        """Start the node; returns once it answers AMQP on ``port``."""
        server_bin = RABBITMQ_BIN_DIR / "rabbitmq-server"
        epmd = shutil.which("epmd") or "/usr/lib/erlang/bin/epmd"
        if not server_bin.exists():
            raise ServiceStartError(f"{server_bin} is missing: install rabbitmq-server (scripts/setup.sh does)")
        if self._server is not None and self._server.running():
            raise ServiceStartError(f"{self!r} is already running")
        _ensure_ports_free("RabbitMQ", self.ports)
        self._write_config()
        env = self._env()
        try:
            # Our own foreground epmd: a child we can stop and reap (rabbitmq-server would otherwise
            # start `epmd -daemon`, which escapes into an orphan that outlives the node).
            self._epmd = _Child.spawn([epmd, "-port", str(self.epmd_port)], log_path=self.epmd_log, env=env)
            _wait_until_ready("epmd", self._epmd, lambda: _port_open(self.epmd_port), 10, (self.epmd_log,))
            self._server = _Child.spawn([str(server_bin)], log_path=self.server_log, env=env, cwd=self.base_dir)
            # The listener opens after all boot steps, so an AMQP handshake means "ready for clients".
            # (`rabbitmqctl await_startup` works too but costs ~0.7 s per CLI start.)
            _wait_until_ready(
                "RabbitMQ",
                self._server,
                lambda: _amqp_answers(self.port),
                timeout,
                (self.server_log, self.node_log),
            )
        except BaseException:
            with contextlib.suppress(Exception):
                self.stop()
            raise

    def stop(self) -> None:
        """Stop the node and its epmd; returns once their ports are closed."""
        if self._server is None and self._epmd is None:
            return
        if self._server is not None:
            # SIGTERM to the rabbitmq-server script only: it forwards TERM to the Erlang VM, which shuts
            # the broker down cleanly. Signalling the group would also hit erl_child_setup and crash the VM.
            self._server.stop(whole_group=False)
        if self._epmd is not None:
            self._epmd.stop()
        still_open = _wait_ports_closed(self.ports, _PORT_CLOSE_TIMEOUT)
        if still_open:
            raise ServiceStopError(f"RabbitMQ {self.node}: port(s) {still_open} still open after stop")
        self._server = None
        self._epmd = None

    def restart(self) -> None:
        """Stop, then start again on the same ports with the same data (durable queues survive)."""
        self.stop()
        self.start()

    def ctl(self, *args: str) -> str:
        """Run ``rabbitmqctl -n NODE ARGS...`` against this node; returns stdout, raises on failure."""
        epmd_was_running = _port_open(self.epmd_port)
        try:
            result = subprocess.run(
                [str(RABBITMQ_BIN_DIR / "rabbitmqctl"), "-n", self.node, *args],
                env=self._env(),
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
        finally:
            if not epmd_was_running:
                # the CLI starts an `epmd -daemon` of its own when none runs on the port; don't leak it
                subprocess.run(
                    [shutil.which("epmd") or "/usr/lib/erlang/bin/epmd", "-port", str(self.epmd_port), "-kill"],
                    env=self._env(),
                    capture_output=True,
                    check=False,
                )
        if result.returncode != 0:
            raise RuntimeError(
                f"rabbitmqctl -n {self.node} {shlex.join(args)} failed (exit {result.returncode}):\n"
                f"{result.stderr.strip() or result.stdout.strip()}"
            )
        return result.stdout

    def is_ready(self) -> bool:
        return _amqp_answers(self.port)

    def _state(self) -> dict[str, Any]:
        return {
            "base_dir": str(self.base_dir),
            "port": self.port,
            "dist_port": self.dist_port,
            "epmd_port": self.epmd_port,
            "server": self._server.state() if self._server else None,
            "epmd": self._epmd.state() if self._epmd else None,
        }

    @classmethod
    def _from_state(cls, state: dict[str, Any]) -> RabbitMQ:
        service = cls(Path(state["base_dir"]), port=int(state["port"]))
        service.dist_port = int(state["dist_port"])
        service.epmd_port = int(state["epmd_port"])
        service._server = _Child.from_state(state.get("server"))
        service._epmd = _Child.from_state(state.get("epmd"))
        return service


# --------------------------------------------------------------------------------------------------
# Cosmos DB (compatible server)


class CosmosServer:
    """``@vercel/cosmosdb-server`` with HTTP keep-alive, in memory, via localdev/cosmos_server.js.

    The azure-cosmos SDK skips TLS verification for https://127.0.0.1 and https://localhost endpoints;
    the server accepts any key, ``key`` is the Cosmos emulator's well-known one.
    """

    kind: ClassVar[str] = "cosmos"

    def __init__(self, base_dir: Path, port: int | None = None):
        self.base_dir = Path(base_dir).resolve()
        self.port: int = port or free_port()
        self.endpoint: str = f"https://{HOST}:{self.port}/"
        self.key: str = COSMOS_EMULATOR_KEY
        self.log = self.base_dir / "cosmos-server.out.log"
        self._server: _Child | None = None

    def __repr__(self) -> str:
        return f"CosmosServer(endpoint={self.endpoint!r}, base_dir={str(self.base_dir)!r})"

    @property
    def ports(self) -> list[int]:
        return [self.port]

    def start(self, timeout: float = 30) -> None:
        node = _node_executable()
        _require_npm_package("@vercel/cosmosdb-server")
        if self._server is not None and self._server.running():
            raise ServiceStartError(f"{self!r} is already running")
        _ensure_ports_free("Cosmos server", self.ports)
        self.base_dir.mkdir(parents=True, exist_ok=True)
        script = REPO_ROOT / "localdev" / "cosmos_server.js"
        try:
            self._server = _Child.spawn(
                [node, str(script), "--port", str(self.port), "--host", HOST],
                log_path=self.log,
                env=_base_env(),
                cwd=REPO_ROOT,
            )
            _wait_until_ready("Cosmos server", self._server, self.is_ready, timeout, (self.log,))
        except BaseException:
            with contextlib.suppress(Exception):
                self.stop()
            raise

    def stop(self) -> None:
        if self._server is not None:
            _stop_child("Cosmos server", self._server, self.ports)
            self._server = None

    def is_ready(self) -> bool:
        return _port_open(self.port)

    def _state(self) -> dict[str, Any]:
        return {
            "base_dir": str(self.base_dir),
            "port": self.port,
            "server": self._server.state() if self._server else None,
        }

    @classmethod
    def _from_state(cls, state: dict[str, Any]) -> CosmosServer:
        service = cls(Path(state["base_dir"]), port=int(state["port"]))
        service._server = _Child.from_state(state.get("server"))
        return service


# --------------------------------------------------------------------------------------------------
# Azurite


class Azurite:
    """Azurite (blob, queue, table) on free ports of 127.0.0.1, data under ``base_dir``."""

    kind: ClassVar[str] = "azurite"

    def __init__(self, base_dir: Path):
        self.base_dir = Path(base_dir).resolve()
        self.blob_port, self.queue_port, self.table_port = _free_ports(3)
        self.data_dir = self.base_dir / "data"
        self.log = self.base_dir / "azurite.out.log"
        self._server: _Child | None = None
        self._set_connection_string()

    def _set_connection_string(self) -> None:
        def endpoint(port: int) -> str:
            return f"http://{HOST}:{port}/{AZURITE_ACCOUNT_NAME}"

        self.connection_string: str = (
            f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT_NAME};"
            f"AccountKey={AZURITE_ACCOUNT_KEY};"
            f"BlobEndpoint={endpoint(self.blob_port)};"
            f"QueueEndpoint={endpoint(self.queue_port)};"
            f"TableEndpoint={endpoint(self.table_port)};"
        )

    def __repr__(self) -> str:
        return f"Azurite(blob={self.blob_port}, queue={self.queue_port}, table={self.table_port})"

    @property
    def ports(self) -> list[int]:
        return [self.blob_port, self.queue_port, self.table_port]

    def start(self, timeout: float = 30) -> None:
        _require_npm_package("azurite")
        azurite = NODE_MODULES / ".bin" / "azurite"
        if self._server is not None and self._server.running():
            raise ServiceStartError(f"{self!r} is already running")
        _ensure_ports_free("Azurite", self.ports)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = _base_env()
        env["PATH"] = f"{Path(_node_executable()).parent}{os.pathsep}{env.get('PATH', '')}"
        args = [
            str(azurite),
            "--silent",
            "--location", str(self.data_dir),
            "--skipApiVersionCheck",
            "--disableTelemetry",
            "--blobHost", HOST, "--blobPort", str(self.blob_port),
            "--queueHost", HOST, "--queuePort", str(self.queue_port),
            "--tableHost", HOST, "--tablePort", str(self.table_port),
        ]  # fmt: skip
        try:
            self._server = _Child.spawn(args, log_path=self.log, env=env, cwd=self.base_dir)
            _wait_until_ready("Azurite", self._server, self.is_ready, timeout, (self.log,))
        except BaseException:
            with contextlib.suppress(Exception):
                self.stop()
            raise

    def stop(self) -> None:
        if self._server is not None:
            _stop_child("Azurite", self._server, self.ports)
            self._server = None

    def is_ready(self) -> bool:
        return all(_port_open(port) for port in self.ports)

    def _state(self) -> dict[str, Any]:
        return {
            "base_dir": str(self.base_dir),
            "ports": self.ports,
            "server": self._server.state() if self._server else None,
        }

    @classmethod
    def _from_state(cls, state: dict[str, Any]) -> Azurite:
        service = cls(Path(state["base_dir"]))
        service.blob_port, service.queue_port, service.table_port = (int(p) for p in state["ports"])
        service._set_connection_string()
        service._server = _Child.from_state(state.get("server"))
        return service


# --------------------------------------------------------------------------------------------------
# Command line

_Service = RabbitMQ | CosmosServer | Azurite
_KINDS: dict[str, type[RabbitMQ] | type[CosmosServer] | type[Azurite]] = {
    cls.kind: cls for cls in (RabbitMQ, CosmosServer, Azurite)
}


def _settings(rabbitmq: RabbitMQ, cosmos: CosmosServer, azurite: Azurite) -> dict[str, str]:
    return {
        "RABBITMQ_URL": rabbitmq.url,
        "COSMOS_ENDPOINT": cosmos.endpoint,
        "COSMOS_KEY": cosmos.key,
        "AzureWebJobsStorage": azurite.connection_string,
    }


def _load_services(state_file: Path) -> dict[str, _Service]:
    state = json.loads(state_file.read_text())
    return {kind: _KINDS[kind]._from_state(entry) for kind, entry in state["services"].items()}


def _start_all(services: list[_Service]) -> dict[str, float]:
    """Start services in parallel; on any failure stop the ones that started and raise."""
    timings: dict[str, float] = {}
    errors: list[BaseException] = []

    def run(service: _Service) -> None:
        began = time.monotonic()
        try:
            service.start()
        except Exception as exc:  # noqa: BLE001 - re-raised below, in the calling thread
            errors.append(exc)
        else:
            timings[service.kind] = time.monotonic() - began

    threads = [threading.Thread(target=run, args=(s,), name=f"start-{s.kind}") for s in services]

    def stop_all() -> None:
        for service in services:
            with contextlib.suppress(Exception):
                service.stop()

    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            thread.join()
    except BaseException:  # Ctrl-C: let the starts finish, then stop everything
        for thread in threads:
            thread.join()
        stop_all()
        raise
    if errors:
        stop_all()
        raise errors[0]
    return timings


def _cmd_start(state_dir: Path) -> int:
    state_file = state_dir / "services.json"
    if state_file.exists():
        services = _load_services(state_file)
        if all(s.is_ready() for s in services.values()):
            print(f"local services already running (state in {state_file})")
            print(_format_settings(json.loads(state_file.read_text())["settings"]))
            return 0
        print("stale local-services state found: stopping what is left of it", file=sys.stderr)
        _stop_services(services.values())
        state_file.unlink()

    for kind in _KINDS:  # a fresh start: no data or logs of an earlier run (Cosmos data is in memory anyway)
        shutil.rmtree(state_dir / kind, ignore_errors=True)
    state_dir.mkdir(parents=True, exist_ok=True)
    rabbitmq = RabbitMQ(state_dir / "rabbitmq")
    cosmos = CosmosServer(state_dir / "cosmos")
    azurite = Azurite(state_dir / "azurite")
    began = time.monotonic()
    try:
        timings = _start_all([rabbitmq, cosmos, azurite])
    except ServiceStartError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    settings = _settings(rabbitmq, cosmos, azurite)
    state = {
        "settings": settings,
        "services": {s.kind: s._state() for s in (rabbitmq, cosmos, azurite)},
    }
    tmp = state_file.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(state_file)
    (state_dir / "services.env").write_text("".join(f"{key}={shlex.quote(value)}\n" for key, value in settings.items()))
    detail = ", ".join(f"{kind} {seconds:.1f} s" for kind, seconds in timings.items())
    print(f"local services started in {time.monotonic() - began:.1f} s ({detail}); state in {state_file}")
    print(_format_settings(settings))
    return 0


def _stop_services(services: Iterable[_Service]) -> list[str]:
    problems = []
    for service in services:
        try:
            service.stop()
        except ServiceStopError as exc:
            problems.append(str(exc))
    return problems


def _cmd_stop(state_dir: Path) -> int:
    state_file = state_dir / "services.json"
    if not state_file.exists():
        print(f"no local services recorded in {state_file}: nothing to stop")
        return 0
    problems = _stop_services(_load_services(state_file).values())
    if problems:
        print("error: " + "; ".join(problems), file=sys.stderr)
        return 1
    state_file.unlink()
    with contextlib.suppress(FileNotFoundError):
        (state_dir / "services.env").unlink()
    print("local services stopped")
    return 0


def _cmd_status(state_dir: Path) -> int:
    state_file = state_dir / "services.json"
    if not state_file.exists():
        print(f"no local services recorded in {state_file}")
        return 3
    services = _load_services(state_file)
    all_up = True
    for kind, service in services.items():
        up = service.is_ready()
        all_up = all_up and up
        print(f"{kind:9} {'up' if up else 'DOWN':5} ports {service.ports}")
    return 0 if all_up else 3


def _format_settings(settings: dict[str, str]) -> str:
    return "\n".join(f"  {key}={value}" for key, value in settings.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m localdev.local_services",
        description="Start, stop or check the local RabbitMQ, Cosmos DB-compatible server and Azurite.",
    )
    parser.add_argument("command", choices=["start", "stop", "status"])
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        help=f"where data, logs and services.json live (default: {DEFAULT_STATE_DIR})",
    )
    args = parser.parse_args(argv)
    state_dir = args.state_dir.resolve()
    commands = {"start": _cmd_start, "stop": _cmd_stop, "status": _cmd_status}
    try:
        return commands[args.command](state_dir)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
