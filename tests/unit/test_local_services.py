"""The local tooling's own plumbing, without services: free ports, and connects to a broker that hangs
mid-handshake (a listener of the test's own). The real local services:
tests/integration/test_local_services.py."""

import logging
import socket
import threading
from collections.abc import Callable

import pika
import pytest

from localdev.local_services import free_port


def test_free_port_can_be_bound():
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


@pytest.mark.parametrize("second", ["local host", "dead-letters command"])
def test_connects_overlapping_in_two_threads_leave_pikas_logging_as_it_was(second):
    """Each connect used to save pika's level, set CRITICAL and restore what it saved: A saves WARNING,
    B saves CRITICAL, A restores WARNING, B restores CRITICAL -- and pika stayed muted for good (issue 11).
    A listener that accepts and holds each connection mid-handshake makes the overlap deterministic."""
    from localdev.local_host import LocalHost
    from localdev.operator_commands import RabbitMqDeadLetters
    from shared.secrets import Scrubber
    from shared.settings import load_settings

    pika_logger = logging.getLogger("pika")
    with socket.create_server(("127.0.0.1", 0)) as listener:
        url = f"amqp://guest:guest@127.0.0.1:{listener.getsockname()[1]}/"
        settings = load_settings({"RABBITMQ_URL": url})
        first_connect = LocalHost(settings).connect
        second_connect = (
            LocalHost(settings).connect
            if second == "local host"
            else RabbitMqDeadLetters(url, "p.", Scrubber(settings)).__enter__
        )
        level = pika_logger.level  # as the hosts set it up
        failures: list[BaseException] = []

        def connect(attempt: Callable[[], object]) -> None:
            try:
                attempt()
            except BaseException as error:  # noqa: BLE001 - whatever the connect raised
                failures.append(error)

        thread_a = threading.Thread(target=connect, args=(first_connect,))
        thread_a.start()
        held_a, _ = listener.accept()  # A is inside its connect
        thread_b = threading.Thread(target=connect, args=(second_connect,))
        thread_b.start()
        held_b, _ = listener.accept()  # and so is B
        held_a.close()  # A fails and leaves first...
        thread_a.join(30)
        held_b.close()  # ...then B
        thread_b.join(30)

    assert len(failures) == 2, failures
    assert all(isinstance(f, pika.exceptions.AMQPError | SystemExit | RuntimeError) for f in failures), failures
    assert pika_logger.level == level
