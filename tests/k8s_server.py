"""A loopback stand-in of the Kubernetes API for custom resources: create, get and delete of Katib
Experiments and Training Operator PyTorchJobs.

The `kubernetes` client's CustomObjectsApi makes, for create_, get_ and delete_namespaced_custom_object:
  POST   /apis/{group}/{version}/namespaces/{ns}/{plural}          (201 + the object; 409 if it exists)
  GET    /apis/{group}/{version}/namespaces/{ns}/{plural}/{name}   (200 + the object; 404 if there is none)
  DELETE /apis/{group}/{version}/namespaces/{ns}/{plural}/{name}   (200 + a Success Status; 404 if none)
Errors are Kubernetes `Status` objects, as the real API server answers. `progress` lets a test play the
controller: it is called with the stored object on every GET and may change its status.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_PATH = re.compile(r"^/apis/(?P<group>[^/]+)/(?P<version>[^/]+)/namespaces/(?P<ns>[^/]+)/(?P<plural>[^/]+)(?:/(?P<name>[^/]+))?$")


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]  # names in lower case (HTTP header names are case-insensitive)
    body: Any


@dataclass
class KubeStandIn:
    objects: dict[tuple[str, str, str], dict] = field(default_factory=dict)  # (plural, ns, name) -> object
    requests: list[Recorded] = field(default_factory=list)
    progress: Callable[[dict, int], None] | None = None  # (object, GET count) -> None
    deleted: list[tuple[str, str, str]] = field(default_factory=list)  # (plural, ns, name) of each DELETE
    gets: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def kubeconfig(self, namespace: str | None = None, token: str = "test-token") -> str:
        context: dict[str, str] = {"cluster": "standin", "user": "tester"}
        if namespace:
            context["namespace"] = namespace
        return json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "standin",
            "clusters": [{"name": "standin", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": token}}],
            "contexts": [{"name": "standin", "context": context}],
        })  # fmt: skip

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


def _status(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "reason": reason, "code": code}


def start(state: KubeStandIn | None = None) -> KubeStandIn:
    state = state or KubeStandIn()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep test output clean
            pass

        def _reply(self, code: int, obj: dict) -> None:
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _record(self) -> tuple[re.Match | None, Any]:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw) if raw else None
            with state.lock:
                state.requests.append(Recorded(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body))
            return _PATH.match(self.path.split("?", 1)[0]), body

        def do_POST(self) -> None:  # noqa: N802 - http.server API
            m, body = self._record()
            if m is None or m["name"]:
                return self._reply(404, _status(404, "NotFound", f"no route for POST {self.path}"))
            name = (body or {}).get("metadata", {}).get("name")
            key = (m["plural"], m["ns"], name)
            with state.lock:
                if key in state.objects:
                    return self._reply(409, _status(409, "AlreadyExists", f'{m["plural"]} "{name}" already exists'))
                obj = json.loads(json.dumps(body))
                obj["metadata"].update(namespace=m["ns"], uid=f"uid-{len(state.objects) + 1}", resourceVersion="1")
                state.objects[key] = obj
            self._reply(201, obj)

        def do_GET(self) -> None:  # noqa: N802 - http.server API
            m, _ = self._record()
            if m is None or not m["name"]:
                return self._reply(404, _status(404, "NotFound", f"no route for GET {self.path}"))
            with state.lock:
                obj = state.objects.get((m["plural"], m["ns"], m["name"]))
                if obj is None:
                    return self._reply(404, _status(404, "NotFound", f'{m["plural"]} "{m["name"]}" not found'))
                state.gets += 1
                if state.progress is not None:
                    state.progress(obj, state.gets)
                obj = json.loads(json.dumps(obj))
            self._reply(200, obj)

        def do_DELETE(self) -> None:  # noqa: N802 - http.server API
            m, _ = self._record()
            if m is None or not m["name"]:
                return self._reply(404, _status(404, "NotFound", f"no route for DELETE {self.path}"))
            key = (m["plural"], m["ns"], m["name"])
            with state.lock:
                if state.objects.pop(key, None) is None:
                    return self._reply(404, _status(404, "NotFound", f'{m["plural"]} "{m["name"]}" not found'))
                state.deleted.append(key)
            self._reply(200, {"kind": "Status", "apiVersion": "v1", "status": "Success", "code": 200})

    state.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=state.server.serve_forever, daemon=True).start()
    return state
