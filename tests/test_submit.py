"""`python -m pipelines submit` against a loopback stand-in of the KFP REST API (tests/submit_server.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipelines import submit as sub
from tests import submit_server
from tests.conftest import REPO
from yolo.errors import UserError

pytest.importorskip("kfp")

IMAGE = "ghcr.io/yolo-pipeline/yolo-pipeline:3f2a9c1"
TOKEN = "s3cr3t-t0ken-value"


def _cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipelines", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )


def _spec_dicts(package: Path) -> dict:
    """A compiled package as the client sends it: proto-normalised PipelineSpec and PlatformSpec dicts."""
    from google.protobuf import json_format
    from kfp.pipeline_spec import pipeline_spec_pb2

    docs = list(yaml.safe_load_all(package.read_text()))
    pipeline = json_format.ParseDict(docs[0], pipeline_spec_pb2.PipelineSpec())
    platform = json_format.ParseDict(docs[1], pipeline_spec_pb2.PlatformSpec())
    return {
        "pipeline_spec": json_format.MessageToDict(pipeline),
        "platform_spec": json_format.MessageToDict(platform),
    }


@pytest.fixture(scope="module")
def server():
    state = submit_server.start()
    yield state
    state.stop()


@pytest.fixture(scope="module")
def submitted(server, tmp_path_factory):
    """One real CLI submission (the acceptance command) and a fresh compile to compare it with."""
    proc = _cli(
        "submit",
        "--host",
        server.url,
        "--token",
        TOKEN,
        "--image",
        IMAGE,
        "--experiment",
        "ci",
        "--epochs",
        "7",
        "--imgsz",
        "640",
        "--gpus",
        "2",
        "--batch-size",
        "32",
        "--param",
        "model_name=yolov5n-ci",
        "--param",
        "min_map50=0.25",
    )
    expected = tmp_path_factory.mktemp("compile") / "expected.yaml"
    fresh = _cli("compile", "--out", str(expected), "--gpus", "2", "--image", IMAGE)
    assert fresh.returncode == 0, fresh.stderr
    return proc, expected


def test_submit_creates_the_run_with_pinned_spec_parameters_and_token(server, submitted):
    proc, expected = submitted
    assert proc.returncode == 0, proc.stderr
    runs = server.created_runs()
    assert len(runs) == 1
    run_id = next(iter(server.runs))
    assert proc.stdout.splitlines() == [f"run_id: {run_id}", f"url: {server.url}/#/runs/details/{run_id}"]

    body = runs[0].body
    assert body["pipeline_spec"] == _spec_dicts(expected)  # exactly a fresh compile for this image and shape
    executors = body["pipeline_spec"]["pipeline_spec"]["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for e in executors.values()} == {IMAGE}
    params = body["runtime_config"]["parameters"]
    assert params["epochs"] == 7 and params["imgsz"] == 640 and params["batch_size"] == 32
    assert params["model_name"] == "yolov5n-ci" and params["min_map50"] == 0.25
    assert params["dataset_source"] == "sample:" and params["workers"] == 8  # the pipeline's defaults
    # the experiment was looked up by name, then created, and the run filed under it
    assert server.experiments["exp-1"]["display_name"] == "ci" and body["experiment_id"] == "exp-1"


def test_every_request_carries_the_bearer_token_which_is_never_shown(server, submitted):
    proc, _ = submitted
    assert server.requests and all(
        r.headers.get("authorization") == f"Bearer {TOKEN}" for r in server.requests
    )
    assert [r.path for r in server.requests][:2] == [sub.HEALTHZ_PATH] * 2  # our check, then the client's
    assert TOKEN not in proc.stdout + proc.stderr
    assert TOKEN not in json.dumps(server.created_runs()[0].body)


def test_flags_mirror_the_pipeline_parameters(submitted):
    _, expected = submitted
    spec = sub.root_parameters(expected)
    assert {name for name, _ in sub.PIPELINE_FLAGS} == set(spec)
    kinds = {int: "NUMBER_INTEGER", float: "NUMBER_DOUBLE", str: "STRING"}
    assert {name: kinds[kind] for name, kind in sub.PIPELINE_FLAGS} == {
        n: p["parameterType"] for n, p in spec.items()
    }


def test_params_are_merged_typed_and_checked_against_the_spec(submitted):
    _, expected = submitted
    spec = sub.root_parameters(expected)
    request = sub.SubmitRequest(
        host="http://x",
        parameters={"epochs": 300.0, "imgsz": "640"},
        raw_parameters={"min_map50": "0.5", "train_extra_args": "--seed 1"},
    )
    values = sub.merge_parameters(spec, request)
    assert values["epochs"] == 300 and isinstance(values["epochs"], int) and values["imgsz"] == 640
    assert values["min_map50"] == 0.5 and values["train_extra_args"] == "--seed 1"
    with pytest.raises(UserError, match="no such parameter.*`epochs`"):
        sub.merge_parameters(spec, sub.SubmitRequest(host="http://x", raw_parameters={"epoch": "3"}))
    with pytest.raises(UserError, match="epochs=many: not a valid integer"):
        sub.merge_parameters(spec, sub.SubmitRequest(host="http://x", raw_parameters={"epochs": "many"}))
    empty = sub.merge_parameters(spec, sub.SubmitRequest(host="http://x", parameters={"weights": None}))
    assert empty["weights"] == ""
    values = sub.merge_parameters(spec, sub.SubmitRequest(host="http://x", parameters={"imgsz": 100}))
    with pytest.raises(UserError, match="imgsz=100: must be a positive multiple of 32"):
        sub.check_values(values, gpus=1)


def test_unreachable_host_fails_fast_with_one_line():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    proc = _cli("submit", "--host", f"http://127.0.0.1:{port}", "--token", TOKEN, "--epochs", "7", timeout=30)
    elapsed = time.monotonic() - start
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "unreachable" in lines[0] and f"127.0.0.1:{port}" in lines[0], proc.stderr
    assert TOKEN not in proc.stderr and proc.stdout == ""
    assert elapsed < 20  # not kfp.Client's 5 x 5 s healthz retries (generous: the machine is shared)


def test_a_host_that_accepts_but_never_answers_times_out():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)  # the kernel accepts the connection; nobody ever replies
        host = f"http://127.0.0.1:{s.getsockname()[1]}"
        with pytest.raises(UserError, match=r"unreachable \(no answer within 0.3 s\)"):
            sub.check_host(host, None, timeout=0.3)


def test_healthz_refusals_are_named(monkeypatch):
    import http.server
    import threading

    class Refuse(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):  # noqa: N802
            code = 401 if "authorization" not in {k.lower() for k in self.headers} else 403
            self.send_response(code if self.path == sub.HEALTHZ_PATH else 404)
            self.end_headers()

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}"
        with pytest.raises(UserError, match="HTTP 401.*pass --token"):
            sub.check_host(url, None, 2)
        with pytest.raises(UserError, match="HTTP 403.*token was refused") as err:
            sub.check_host(url, TOKEN, 2)
        assert TOKEN not in str(err.value)
        with pytest.raises(UserError, match="HTTP 404"):
            sub.check_host(url + "/wrong", None, 2)
    finally:
        srv.shutdown()
        srv.server_close()
    with pytest.raises(UserError, match="expected http://"):
        sub.check_host("ml-pipeline:8888", None, 1)


def test_multi_user_backend_needs_a_namespace():
    state = submit_server.start(multi_user=True)
    try:
        from pipelines.__main__ import main

        assert main(["submit", "--host", state.url, "--epochs", "3"]) == 2
        assert not state.created_runs()
    finally:
        state.stop()


def test_a_rejected_run_is_one_line_naming_the_server_reason(capsys):
    from pipelines.__main__ import main

    state = submit_server.start(reject_runs=(400, "Invalid input error: pipeline spec is invalid"))
    try:
        assert main(["submit", "--host", state.url, "--token", TOKEN, "--image", IMAGE, "--epochs", "3"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0] == (
            f"python -m pipelines submit: error: {state.url}: KFP API HTTP 400: "
            "Invalid input error: pipeline spec is invalid"
        )
        assert "Traceback" not in "\n".join(err) and TOKEN not in "\n".join(err)
    finally:
        state.stop()


def test_dataset_rev_resolves_to_the_commit_sha(tmp_path):
    repo = tmp_path / "data-repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q", "-b", "main"], check=True)
    (repo / "a.txt").write_text("1")
    subprocess.run([*git, "add", "a.txt"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "one"], check=True)
    sha = subprocess.run(
        [*git, "rev-parse", "main"], capture_output=True, text=True, check=True
    ).stdout.strip()
    values = {"dataset_source": f"dvc://{repo}#data/coco", "dataset_rev": "main"}
    assert sha in sub.resolve_dataset_rev(values) and values["dataset_rev"] == sha
    with pytest.raises(UserError, match="no ref named|main2"):
        sub.resolve_dataset_rev({"dataset_source": f"dvc://{repo}#data", "dataset_rev": "main2"})
    with pytest.raises(UserError, match="only a dvc:// dataset source has a rev"):
        sub.resolve_dataset_rev({"dataset_source": "sample:", "dataset_rev": "main"})


@pytest.mark.parametrize(
    ("ref", "pinned"),
    [
        ("ghcr.io/org/img:3f2a9c1", True),
        ("localhost:5000/img@sha256:" + "a" * 64, True),
        ("img:1.2", True),
        ("ghcr.io/org/img", False),
        ("ghcr.io/org/img:latest", False),
    ],
)
def test_image_pinning(ref, pinned):
    assert sub.is_pinned(ref) is pinned


@pytest.mark.parametrize("ref", ["Ghcr.io/Org/IMG:1", "img@sha256:xyz", "img:bad tag", ""])
def test_image_reference_syntax(ref):
    with pytest.raises(UserError, match="not an image reference"):
        sub.split_image(ref)


def test_token_from_the_sdk_token_file(tmp_path, monkeypatch):
    monkeypatch.setenv(sub.TOKEN_PATH_ENV, str(tmp_path / "token"))
    with pytest.raises(UserError, match="cannot read the token file"):
        sub.read_token(None)
    (tmp_path / "token").write_text(f"{TOKEN}\n")
    assert sub.read_token(None) == TOKEN
    assert sub.read_token("explicit") == "explicit"
    monkeypatch.delenv(sub.TOKEN_PATH_ENV)
    assert sub.read_token(None) is None and sub.read_token("") is None


def test_params_file_keys_are_checked(tmp_path):
    good = tmp_path / "p.yaml"
    good.write_text(
        "experiment: e\ncluster: {gpus: 2, node-selector: {pool: gpu}}\nparameters: {batch-size: 64}\n"
    )
    loaded = sub.load_params_file(good)
    assert loaded.experiment == "e" and loaded.cluster == {"gpus": 2, "node_selector": {"pool": "gpu"}}
    assert loaded.parameters == {"batch_size": 64}
    assert sub._cluster_args(loaded.cluster) == ["--gpus", "2", "--node-selector", "pool=gpu"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("parameters: {epoch: 3}\n")
    with pytest.raises(
        UserError, match=r"bad.yaml: unknown key `epoch` in `parameters` \(did you mean `epochs`"
    ):
        sub.load_params_file(bad)
    production = sub.load_params_file(REPO / "pipelines" / "production.yaml")
    assert production.cluster["gpus"] >= 1 and production.parameters["imgsz"] == 640


def test_wait_reports_the_final_state(capsys):
    result = sub.SubmitResult("r1", "http://h/#/runs/details/r1", "e", IMAGE, {}, state="FAILED")
    assert sub.report(result) == 1
    assert capsys.readouterr().out.splitlines()[-1] == "state: FAILED"
    assert sub.report(sub.SubmitResult("r1", "u", "e", IMAGE, {}, state="SUCCEEDED")) == 0


def test_submit_with_a_toleration_and_an_image():
    """Issue 15, fix 1: the compile child crashed when given --toleration and --image together."""
    state = submit_server.start()
    try:
        proc = _cli("submit", "--host", state.url, "--image", IMAGE, "--toleration", "gpu=true:NoSchedule")
        assert proc.returncode == 0, proc.stderr
        (run,) = state.created_runs()
        platform = run.body["pipeline_spec"]["platform_spec"]
        train = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-train"]
        assert train["tolerations"] == [{"key": "gpu", "operator": "Equal", "value": "true", "effect": "NoSchedule"}]
    finally:
        state.stop()
