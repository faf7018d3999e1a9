"""A loopback stand-in of the KFP v2beta1 REST API: the calls kfp.Client makes to submit and watch a run.

kfp 2.x (kfp/client/client.py) makes, for `Client(host, existing_token)` +
`create_run_from_pipeline_package(...)` + `wait_for_run_completion(...)`:
  GET  /apis/v2beta1/healthz                   (Client.__init__, when no namespace is set)
  GET  /apis/v2beta1/experiments?filter=...    (create_experiment → get_experiment by display_name)
  POST /apis/v2beta1/experiments               (only when none matched)
  POST /apis/v2beta1/runs                      (run_pipeline; the body holds pipeline_spec and runtime_config)
  GET  /apis/v2beta1/runs/{run_id}             (get_run / wait_for_run_completion)
and for pipeline versions and schedules (`upload`, `submit --pipeline-version`, `schedule`):
  GET  /apis/v2beta1/pipelines?filter=...&namespace=...          (list_pipelines by display_name)
  POST /apis/v2beta1/pipelines/upload?name=...&namespace=...     (upload_pipeline, multipart package)
  POST /apis/v2beta1/pipelines/upload_version?name=...&pipelineid=...   (upload_pipeline_version)
  GET  /apis/v2beta1/pipelines/{id}/versions?filter=...          (list_pipeline_versions)
  POST /apis/v2beta1/recurringruns                                (create_recurring_run)
Every request is recorded with its headers and JSON body, for the tests to assert on.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import yaml

API = "/apis/v2beta1"


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: Any


@dataclass
class KfpStandIn:
    """State of the stand-in: experiments, runs, and every request seen."""

    multi_user: bool = False
    version: str = "2.15.0"  # healthz tag_name (the oldest backend the default pipeline runs on)
    run_state: str = "SUCCEEDED"
    reject_runs: tuple[int, str] | None = None  # (HTTP status, message) answered to POST /runs
    requests: list[Recorded] = field(default_factory=list)
    experiments: dict[str, dict] = field(default_factory=dict)
    runs: dict[str, dict] = field(default_factory=dict)
    pipelines: dict[str, dict] = field(default_factory=dict)
    versions: dict[str, dict] = field(default_factory=dict)  # version id -> version (with pipeline_id)
    recurring_runs: dict[str, dict] = field(default_factory=dict)
    on_request: Callable[[Recorded], None] | None = None  # called with every request, after recording
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def created_runs(self) -> list[Recorded]:
        return [r for r in self.requests if r.method == "POST" and r.path == f"{API}/runs"]

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


def _handler(state: KfpStandIn):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet
            pass

        def _record(self) -> Recorded:
            parsed = urlparse(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            headers = {k.lower(): v for k, v in self.headers.items()}  # HTTP names are case-insensitive
            if headers.get("content-type", "").startswith("multipart/form-data"):
                body = _uploaded_file(headers["content-type"], raw)
            else:
                body = json.loads(raw) if raw else None
            rec = Recorded(self.command, parsed.path, parse_qs(parsed.query), headers, body)
            with state.lock:
                state.requests.append(rec)
            if state.on_request is not None:
                state.on_request(rec)
            return rec

        def _send(self, status: int, obj: Any) -> None:
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 - http.server API
            rec = self._record()
            if rec.path == f"{API}/healthz":
                return self._send(
                    200, {"commit_sha": "stand-in", "tag_name": state.version, "multi_user": state.multi_user}
                )
            if rec.path == f"{API}/experiments":
                wanted = None
                if rec.query.get("filter"):
                    predicates = json.loads(rec.query["filter"][0]).get("predicates", [])
                    wanted = next((p.get("stringValue", p.get("string_value")) for p in predicates), None)
                found = [e for e in state.experiments.values() if wanted in (None, e["display_name"])]
                return self._send(200, {"experiments": found, "total_size": len(found)} if found else {})
            if rec.path == f"{API}/pipelines":
                wanted = _filtered_name(rec)
                ns = rec.query.get("namespace", [None])[0]
                found = [p for p in state.pipelines.values()
                         if wanted in (None, p["display_name"]) and p.get("namespace") == ns]  # fmt: skip
                return self._send(200, {"pipelines": found, "total_size": len(found)} if found else {})
            if rec.path.startswith(f"{API}/pipelines/") and rec.path.endswith("/versions"):
                pipeline_id = rec.path.split("/")[-2]
                wanted = _filtered_name(rec)
                found = [v for v in state.versions.values()
                         if v["pipeline_id"] == pipeline_id and wanted in (None, v["display_name"])]  # fmt: skip
                return self._send(200, {"pipeline_versions": found, "total_size": len(found)} if found else {})
            if rec.path.startswith(f"{API}/runs/"):
                run = state.runs.get(rec.path.rsplit("/", 1)[-1])
                if run is None:
                    return self._send(404, {"error": "run not found", "code": 5, "message": "run not found"})
                return self._send(200, {**run, "state": state.run_state})
            return self._send(404, {"error": "not found", "code": 5, "message": f"no route {rec.path}"})

        def _add_version(self, pipeline_id: str, name: str, package: bytes) -> dict:
            docs = list(yaml.safe_load_all(package))
            spec = {"pipeline_spec": docs[0], "platform_spec": docs[1]} if len(docs) > 1 else docs[0]
            version_id = f"version-{len(state.versions) + 1}"
            version = {"pipeline_id": pipeline_id, "pipeline_version_id": version_id, "display_name": name,
                       "pipeline_spec": spec}  # fmt: skip
            state.versions[version_id] = version
            return version

        def do_POST(self) -> None:  # noqa: N802 - http.server API
            rec = self._record()
            if rec.path == f"{API}/experiments":
                experiment_id = f"exp-{len(state.experiments) + 1}"
                experiment = {"experiment_id": experiment_id, "display_name": rec.body["display_name"]}
                if rec.body.get("namespace"):
                    experiment["namespace"] = rec.body["namespace"]
                state.experiments[experiment_id] = experiment
                return self._send(200, experiment)
            if rec.path == f"{API}/pipelines/upload":
                pipeline_id = f"pipeline-{len(state.pipelines) + 1}"
                name = rec.query["name"][0]
                pipeline = {"pipeline_id": pipeline_id, "display_name": name,
                            "namespace": rec.query.get("namespace", [None])[0]}  # fmt: skip
                state.pipelines[pipeline_id] = pipeline
                self._add_version(pipeline_id, name, rec.body)  # KFP stores the upload as a first version
                return self._send(200, pipeline)
            if rec.path == f"{API}/pipelines/upload_version":
                pipeline_id = rec.query["pipelineid"][0]
                if pipeline_id not in state.pipelines:
                    return self._send(404, {"error": "no pipeline", "code": 5, "message": "pipeline not found"})
                return self._send(200, self._add_version(pipeline_id, rec.query["name"][0], rec.body))
            if rec.path == f"{API}/recurringruns":
                recurring_id = f"recurring-{len(state.recurring_runs) + 1}"
                state.recurring_runs[recurring_id] = {**rec.body, "recurring_run_id": recurring_id}
                return self._send(200, state.recurring_runs[recurring_id])
            if rec.path == f"{API}/runs" and state.reject_runs:
                status, message = state.reject_runs
                return self._send(status, {"error": message, "code": 3, "message": message})
            if rec.path == f"{API}/runs":
                run_id = f"run-{len(state.runs) + 1:04d}"
                run = {
                    "run_id": run_id,
                    "display_name": rec.body.get("display_name"),
                    "experiment_id": rec.body.get("experiment_id"),
                    "state": "PENDING",
                }
                state.runs[run_id] = run
                return self._send(200, run)
            return self._send(404, {"error": "not found", "code": 5, "message": f"no route {rec.path}"})

    return Handler


def _uploaded_file(content_type: str, raw: bytes) -> bytes:
    """The file part of a multipart/form-data upload (the pipeline package)."""
    message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + raw)
    for part in message.iter_parts():
        if part.get_filename():
            return part.get_payload(decode=True)
    return b""


def _filtered_name(rec: Recorded) -> str | None:
    if not rec.query.get("filter"):
        return None
    predicates = json.loads(rec.query["filter"][0]).get("predicates", [])
    return next((p.get("stringValue", p.get("string_value")) for p in predicates), None)


def start(**kwargs) -> KfpStandIn:
    """A stand-in on 127.0.0.1 and a free port, served from a daemon thread."""
    state = KfpStandIn(**kwargs)
    state.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    threading.Thread(target=state.server.serve_forever, daemon=True).start()
    return state
