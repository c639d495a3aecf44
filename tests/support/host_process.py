"""`python -m localdev run` as the end-to-end tests run it: in the background, on a queue prefix of
the test's own, its output in a file."""

from __future__ import annotations

import signal
import subprocess
import uuid
from datetime import timedelta
from pathlib import Path

from tests.support.helpers import APP_ROOT, CLI

TOKEN_LIFETIME = timedelta(hours=3)  # well past the threshold: a refreshed connection is never due again


def fault_args(env: dict) -> list[str]:
    # One worker: the scripted fault sequences (refuse after call N, ...) assume calls in order.
    # Concurrent workers are covered by tests/e2e/test_end_to_end.py.
    return ["--queue-prefix", env["FAULT_QUEUE_PREFIX"], "--workers", "1"]


class Host:
    """`python -m localdev run` in the background; its output goes to files (no pipe to fill)."""

    def __init__(self, env: dict, log_dir: Path, *args: str):
        self.log = log_dir / f"host-{uuid.uuid4().hex[:6]}.log"
        with self.log.open("w") as log:
            command = [*CLI, "run", *args, *fault_args(env)]
            self.process = subprocess.Popen(
                command, cwd=APP_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def interrupt(self, timeout: float = 20) -> int:
        self.process.send_signal(signal.SIGINT)
        return self.process.wait(timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
