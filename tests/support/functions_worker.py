"""The Functions host, played against the real Azure Functions Python worker library.

In Azure, the Functions host starts the Python worker and drives it over gRPC with the messages of
`FunctionRpc.proto`: a WorkerInitRequest, a FunctionsMetadataRequest, one FunctionLoadRequest per
`function.json`, then one InvocationRequest per trigger. On Python 3.13 the worker that handles them
for folder + `function.json` apps is the PyPI package `azure-functions-runtime-v1`, the version pinned
in requirements.txt. This module sends it the same messages, built the way the host builds them, in
this process (the worker's own generated protos, no gRPC channel). What it exercises is exactly what
Azure runs: the worker's loader, its signature and binding checks, its trigger converters and the
Context it passes.

Only the transport is ours: the host's gRPC stream becomes direct calls to the worker's handlers,
and Service Bus becomes `ServiceBusDelivery` (the trigger metadata the Service Bus extension sends); the broker and
the extension's receiving are tests/support/service_bus_host.py, on the Service Bus model.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.machinery
import importlib.metadata
import importlib.util
import json
import sys
import threading
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

WORKER_DISTRIBUTION = "azure-functions-runtime-v1"


@cache
def worker_protos() -> ModuleType:
    """The worker package's generated `FunctionRpc_pb2` (the host <-> worker contract).

    The package ships them under a top-level `tests/protos` folder whose `__init__` imports grpc; they
    are loaded here as a package of their own name, without running that `__init__`."""
    root = Path(str(importlib.metadata.distribution(WORKER_DISTRIBUTION).locate_file("tests/protos")))
    if not (root / "FunctionRpc_pb2.py").is_file():
        raise RuntimeError(f"{WORKER_DISTRIBUTION} has no generated protos at {root}")
    spec = importlib.machinery.ModuleSpec("_functions_worker_protos", None, is_package=True)
    spec.submodule_search_locations = [str(root)]
    sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    return importlib.import_module(f"{spec.name}.FunctionRpc_pb2")


# function.json -> FunctionLoadRequest ------------------------------------------------------------


@dataclass(frozen=True)
class FunctionFolder:
    """One function of a v1 app: a folder holding function.json (and the script it names)."""

    directory: Path
    definition: dict[str, Any]

    @classmethod
    def read(cls, directory: Path) -> FunctionFolder:
        return cls(directory.resolve(), json.loads((directory / "function.json").read_text(encoding="utf-8")))

    @property
    def name(self) -> str:
        return self.directory.name  # the host names a v1 function after its folder

    @property
    def trigger(self) -> dict[str, Any]:
        [trigger] = [b for b in self.definition["bindings"] if b["type"].endswith("Trigger")]
        return trigger

    @property
    def queue_name(self) -> str | None:
        return self.trigger.get("queueName")

    def load_request(self, function_id: str) -> Any:
        """The FunctionLoadRequest the host sends for this folder (HostFunctionMetadataProvider and
        GrpcWorkerChannel.GetFunctionLoadRequest): the folder name, the folder's absolute path, the
        script's absolute path, the entry point ("" = the worker's default, `main`), and the bindings
        keyed by name with their type verbatim, direction and dataType. The host leaves language,
        raw_bindings and retry options unset in this message."""
        protos = worker_protos()
        bindings = {}
        for binding in self.definition["bindings"]:
            info = protos.BindingInfo(
                type=binding["type"], direction=getattr(protos.BindingInfo, binding.get("direction", "in").lower())
            )
            if "dataType" in binding:
                info.data_type = getattr(protos.BindingInfo, binding["dataType"].lower())
            bindings[binding["name"]] = info
        metadata = protos.RpcFunctionMetadata(
            name=self.name,
            directory=str(self.directory),
            script_file=str(self.directory / self.definition.get("scriptFile", "__init__.py")),
            entry_point=self.definition.get("entryPoint", ""),
            bindings=bindings,
            properties={"FunctionId": function_id},
        )
        return protos.StreamingMessage(
            request_id=str(uuid.uuid4()),
            function_load_request=protos.FunctionLoadRequest(function_id=function_id, metadata=metadata),
        )


def function_folders(app_root: Path) -> list[FunctionFolder]:
    """Every function of the app, as the host finds them: the folders with a function.json."""
    return [FunctionFolder.read(path.parent) for path in sorted(app_root.glob("*/function.json"))]


# Triggers -> InvocationRequest input -------------------------------------------------------------


def _json(value: Any) -> Any:
    return worker_protos().TypedData(json=json.dumps(value))


def _string(value: str) -> Any:
    return worker_protos().TypedData(string=value)


def _dotnet_time(moment: datetime, offset: bool = False) -> str:
    """A UTC time as the host's JSON serializer (Newtonsoft) writes a .NET DateTime: up to 7
    fractional digits without trailing zeros, and no offset for the Service Bus `...Utc` values
    (DateTimeKind.Unspecified); `offset` adds "+00:00" as for a DateTimeOffset."""
    utc = moment.astimezone(UTC)
    text = utc.strftime("%Y-%m-%dT%H:%M:%S") + f".{utc.microsecond:06d}0".rstrip("0").rstrip(".")
    return text + ("+00:00" if offset else "")


def timer_trigger(past_due: bool, now: datetime | None = None) -> tuple[Any, dict[str, Any]]:
    """The timer trigger's input (the TimerInfo as JSON) and trigger metadata, as the host sends them:
    the only metadata is `TimerTrigger`, the local time as text."""
    now = now or datetime.now(UTC)
    info = {
        "Schedule": {"AdjustForDST": True},
        "ScheduleStatus": {
            "Last": _dotnet_time(now - timedelta(minutes=1), offset=True),
            "Next": _dotnet_time(now + timedelta(minutes=1), offset=True),
            "LastUpdated": _dotnet_time(now - timedelta(minutes=1), offset=True),
        },
        "IsPastDue": past_due,
    }
    return _json(info), {"TimerTrigger": _string(now.strftime("%m/%d/%Y %H:%M:%S"))}


BODY_KINDS = ("string", "json", "bytes")


@dataclass
class ServiceBusDelivery:
    """One delivery of a Service Bus message to a function: its body and what the broker and the
    sender set on it. `trigger_metadata()` is what the Service Bus extension hands the worker."""

    body: bytes
    message_id: str
    delivery_count: int = 1
    sequence_number: int = 1
    content_type: str | None = None
    session_id: str | None = None
    correlation_id: str | None = None
    subject: str | None = None
    application_properties: dict[str, Any] = field(default_factory=dict)
    enqueued_time_utc: datetime = field(default_factory=lambda: datetime.now(UTC))
    lock_token: str = field(default_factory=lambda: str(uuid.uuid4()))
    body_kind: str = "string"  # how the host passes the body: TypedData string, json or bytes

    @classmethod
    def of_event(cls, event: Any) -> ServiceBusDelivery:
        """The first delivery of the message the app's Service Bus transport sends for `event`
        (`shared.messaging.service_bus_message`)."""
        from shared.messaging import service_bus_message

        message = service_bus_message(event)
        return cls(
            body=b"".join(message.body),
            message_id=message.message_id,
            content_type=message.content_type,
            session_id=message.session_id,
            application_properties={str(k): v for k, v in (message.application_properties or {}).items()},
        )

    def input_data(self) -> Any:
        protos = worker_protos()
        if self.body_kind == "bytes":
            return protos.TypedData(bytes=self.body)
        text = self.body.decode("utf-8")
        return protos.TypedData(json=text) if self.body_kind == "json" else protos.TypedData(string=text)

    def trigger_metadata(self) -> dict[str, Any]:
        """The Service Bus extension's binding data, as the host hands it to the worker: numbers,
        times and dictionaries as JSON text, strings as strings, null values left out; and, as the
        host does for a JSON object body, each top-level property of the body as well."""
        enqueued = self.enqueued_time_utc
        expires = enqueued + timedelta(days=14)
        metadata: dict[str, Any] = {}
        if self.body.lstrip().startswith(b"{"):
            try:
                document = json.loads(self.body)
            except ValueError:
                document = {}
            for key, value in document.items():  # Utility.ApplyBindingData
                if isinstance(value, dict):
                    metadata[key] = _json(value)
                elif not isinstance(value, list):  # a JToken cast to string: true -> "True", null -> ""
                    metadata[key] = _string("" if value is None else str(value))
        metadata |= {
            "DeliveryCount": _json(self.delivery_count),
            "LockToken": _string(self.lock_token),
            "ExpiresAtUtc": _json(_dotnet_time(expires)),
            "ExpiresAt": _json(_dotnet_time(expires, offset=True)),
            "EnqueuedTimeUtc": _json(_dotnet_time(enqueued)),
            "EnqueuedTime": _json(_dotnet_time(enqueued, offset=True)),
            "MessageId": _string(self.message_id),
            "SequenceNumber": _json(self.sequence_number),
            "ApplicationProperties": _json(self.application_properties),
            "UserProperties": _json(self.application_properties),
            "MessageActions": _json({}),
            "Client": _json({"FullyQualifiedNamespace": "token-refresh-bus.servicebus.windows.net", "IsClosed": False}),
        }
        if self.session_id is not None:
            metadata["SessionActions"] = _json({})
        optional = {
            "ContentType": self.content_type,
            "SessionId": self.session_id,
            "CorrelationId": self.correlation_id,
            "Subject": self.subject,
            "Label": self.subject,
        }
        metadata |= {key: _string(value) for key, value in optional.items() if value is not None}
        return metadata

    def redelivered(self) -> ServiceBusDelivery:
        """The same message delivered again after a failed invocation (the lock is new)."""
        return ServiceBusDelivery(
            **{**self.__dict__, "delivery_count": self.delivery_count + 1, "lock_token": str(uuid.uuid4())}
        )


# The worker --------------------------------------------------------------------------------------


@dataclass
class InvocationResult:
    invocation_id: str
    succeeded: bool
    error: str  # the worker's RpcException message when it failed

    def raise_for_failure(self) -> None:
        if not self.succeeded:
            raise AssertionError(f"invocation {self.invocation_id} failed: {self.error}")


class FunctionsWorker:
    """The real worker library, driven like the host drives it: `start()` sends WorkerInit and
    FunctionsMetadata, `load(folder)` a FunctionLoadRequest, `invoke_*` InvocationRequests.

    The worker is a process-wide singleton (its function registry and protos are module globals), so
    one FunctionsWorker per process; a test that needs a fresh worker runs it in a subprocess. Its
    asyncio loop runs on a thread of its own, like the worker's gRPC loop, and sync functions run on
    the worker's own thread pool, so several invocations can be in flight at once."""

    def __init__(self, app_root: Path):
        self.app_root = app_root.resolve()
        self.loaded: dict[str, str] = {}  # function name -> function id
        self.load_errors: dict[str, str] = {}
        self._real_mains: dict[str, Callable[..., Any]] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="functions-worker-loop", daemon=True)
        self._worker: Any = None

    # Lifecycle -------------------------------------------------------------------------------

    def start(self) -> FunctionsWorker:
        import azure_functions_runtime_v1 as worker

        self._worker = worker
        # The proxy worker appends AzureWebJobsScriptRoot (the app root) to sys.path: function folders
        # import `shared` from there. (The worker itself imports them as `__app__.<folder>`.)
        if str(self.app_root) not in sys.path:
            sys.path.append(str(self.app_root))
        self._thread.start()
        protos = worker_protos()
        init = self._call(
            worker.worker_init_request,
            protos.StreamingMessage(
                request_id=str(uuid.uuid4()),
                worker_init_request=protos.WorkerInitRequest(
                    host_version="4.1037.0.0",
                    function_app_directory=str(self.app_root),
                    worker_directory=str(Path(worker.__file__).parent),
                    capabilities={"MultiStream": "10"},
                ),
            ),
            properties={"protos": worker_protos(), "host": None},
        )
        self._expect_success("WorkerInit", init)
        metadata = self._call(
            worker.functions_metadata_request,
            protos.StreamingMessage(
                request_id=str(uuid.uuid4()),
                functions_metadata_request=protos.FunctionsMetadataRequest(function_app_directory=str(self.app_root)),
            ),
        )
        self._expect_success("FunctionsMetadata", metadata)
        if not metadata.use_default_metadata_indexing:
            raise AssertionError(
                "the worker indexed the app itself; a v1 app is indexed by the host from function.json"
            )
        worker.start_threadpool_executor()
        return self

    def stop(self) -> None:
        if self._worker is not None:
            self._worker.stop_threadpool_executor()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def load(self, folder: FunctionFolder) -> bool:
        function_id = str(uuid.uuid4())
        response = self._call(self._worker.function_load_request, folder.load_request(function_id))
        if response.result.status == worker_protos().StatusResult.Success:
            self.loaded[folder.name] = function_id
            return True
        self.load_errors[folder.name] = response.result.exception.message
        return False

    def load_all(self) -> dict[str, str]:
        """Load every function of the app; the errors by function name (empty when all loaded)."""
        for folder in function_folders(self.app_root):
            self.load(folder)
        return dict(self.load_errors)

    # Invocations -----------------------------------------------------------------------------

    def invoke(
        self,
        function_name: str,
        trigger_name: str,
        trigger_input: Any,
        trigger_metadata: dict[str, Any],
        trace_parent: str | None = None,
    ) -> InvocationResult:
        protos = worker_protos()
        invocation_id = str(uuid.uuid4())
        request = protos.InvocationRequest(
            invocation_id=invocation_id,
            function_id=self.loaded[function_name],
            input_data=[protos.ParameterBinding(name=trigger_name, data=trigger_input)],
            trigger_metadata=trigger_metadata,
            trace_context=protos.RpcTraceContext(
                trace_parent=trace_parent or f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01",
                trace_state="",
                attributes={"OperationName": function_name},
            ),
        )
        response = self._call(
            self._worker.invocation_request,
            protos.StreamingMessage(request_id=str(uuid.uuid4()), invocation_request=request),
        )
        succeeded = response.result.status == protos.StatusResult.Success
        return InvocationResult(invocation_id, succeeded, "" if succeeded else response.result.exception.message)

    def invoke_timer(
        self, function_name: str, past_due: bool = False, trace_parent: str | None = None
    ) -> InvocationResult:
        folder = self._folder(function_name)
        trigger_input, metadata = timer_trigger(past_due)
        return self.invoke(function_name, folder.trigger["name"], trigger_input, metadata, trace_parent)

    def invoke_service_bus(
        self, function_name: str, delivery: ServiceBusDelivery, trace_parent: str | None = None
    ) -> InvocationResult:
        folder = self._folder(function_name)
        metadata = delivery.trigger_metadata()
        return self.invoke(function_name, folder.trigger["name"], delivery.input_data(), metadata, trace_parent)

    def record_arguments(self, function_name: str) -> list[dict[str, Any]]:
        """From now on, keep the arguments the worker passes to this function's main() (trigger
        object and context), in call order. Wraps the loaded function in the worker's registry, after
        the worker's own checks ran on the real one."""
        from azure_functions_runtime_v1 import handle_event

        registry = handle_event._functions._functions  # the worker's loaded functions, by id
        function_id = self.loaded[function_name]
        info = registry[function_id]
        calls: list[dict[str, Any]] = []
        real_main = self._real_mains.setdefault(function_id, info.func)  # a new recording replaces the last

        def recording_main(**arguments: Any) -> Any:
            calls.append(arguments)
            return real_main(**arguments)

        registry[function_id] = info._replace(func=recording_main)
        return calls

    # Plumbing --------------------------------------------------------------------------------

    def _folder(self, function_name: str) -> FunctionFolder:
        return FunctionFolder.read(self.app_root / function_name)

    def _call(
        self, handler: Callable[[Any], Coroutine[Any, Any, Any]], message: Any, properties: dict | None = None
    ) -> Any:
        """Hand one host message to a worker handler, as the proxy worker's dispatcher does (it passes
        properties with WorkerInit only; the worker keeps the protos from there)."""
        request = _HostMessage(message, properties)
        return asyncio.run_coroutine_threadsafe(handler(request), self._loop).result(timeout=600)

    @staticmethod
    def _expect_success(step: str, response: Any) -> None:
        if response.result.status != worker_protos().StatusResult.Success:
            raise AssertionError(f"{step} failed: {response.result.exception.message}")


@dataclass
class _HostMessage:
    """What the worker's dispatcher passes its handlers: the StreamingMessage and its properties."""

    request: Any
    properties: dict[str, Any] | None


def main(argv: list[str]) -> int:
    """`python -m tests.support.functions_worker APP_ROOT`: start a fresh worker, load every function
    of the app as the host would, print {"loaded": [...], "errors": {name: message}} as JSON. Exit 1
    when a function did not load."""
    worker = FunctionsWorker(Path(argv[0])).start()
    try:
        errors = worker.load_all()
        print(json.dumps({"loaded": sorted(worker.loaded), "errors": errors}))
    finally:
        worker.stop()
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
