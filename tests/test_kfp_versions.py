"""upload → version → run of that version → recurring run, against the KFP REST stand-in
(tests/submit_server.py), on a multi-user backend: every request carries the bearer token, and every
namespaced one the profile namespace."""

from __future__ import annotations

import json

import pytest

from pipelines.__main__ import main
from tests import submit_server

pytest.importorskip("kfp")

IMAGE = "ghcr.io/yolo-pipeline/yolo-pipeline:3f2a9c1"
NS = "team-a"


@pytest.fixture
def server(tmp_path, monkeypatch):
    token = tmp_path / "token"
    token.write_text("token-one\n")
    monkeypatch.delenv("KFP_TOKEN", raising=False)
    state = submit_server.start(multi_user=True)
    state.token_file = token
    yield state
    state.stop()


def _cli(server, capsys, *args: str) -> dict[str, str]:
    code = main([*args, "--host", server.url, "--token-file", str(server.token_file), "--namespace", NS])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return dict(line.split(": ", 1) for line in captured.out.strip().splitlines())


def test_upload_version_run_and_schedule(server, capsys):
    first = _cli(server, capsys, "upload", "--name", "yolo", "--version", "v1", "--image", IMAGE, "--gpus", "2")
    second = _cli(server, capsys, "upload", "--name", "yolo", "--version", "v2", "--image", IMAGE)
    assert first["pipeline_id"] == second["pipeline_id"] == "pipeline-1"
    (pipeline,) = server.pipelines.values()
    assert pipeline == {"pipeline_id": "pipeline-1", "display_name": "yolo", "namespace": NS}
    v1 = server.versions[first["version_id"]]
    assert v1["display_name"] == "v1"
    executors = v1["pipeline_spec"]["pipeline_spec"]["deploymentSpec"]["executors"]
    assert executors["exec-train"]["container"]["resources"]["accelerator"]["resourceCount"] == "2"
    assert {e["container"]["image"] for e in executors.values()} == {IMAGE}

    run = _cli(server, capsys, "submit", "--pipeline", "yolo", "--pipeline-version", "v1", "--epochs", "5")
    (created,) = server.created_runs()
    assert created.body["pipeline_version_reference"] == {"pipeline_id": "pipeline-1",
                                                          "pipeline_version_id": first["version_id"]}  # fmt: skip
    assert "pipeline_spec" not in created.body  # the stored version runs, nothing compiled now
    assert created.body["runtime_config"]["parameters"]["epochs"] == 5
    assert run["run_id"] == "run-0001"

    scheduled = _cli(server, capsys, "schedule", "--cron", "0 3 * * 1", "--pipeline", "yolo",
                     "--pipeline-version", "v2", "--epochs", "7")  # fmt: skip
    (recurring,) = server.recurring_runs.values()
    assert scheduled["recurring_run_id"] == recurring["recurring_run_id"]
    assert recurring["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * 1"
    assert recurring["pipeline_version_reference"]["pipeline_version_id"] == second["version_id"]
    assert int(recurring["max_concurrency"]) == 1
    assert recurring["no_catchup"] is True and recurring["mode"] == "ENABLE"
    assert recurring["runtime_config"]["parameters"]["epochs"] == 7

    experiments = {e["experiment_id"]: e for e in server.experiments.values()}
    for request in server.requests:
        assert request.headers.get("authorization") == "Bearer token-one", (request.method, request.path)
        if request.path.endswith(("/pipelines", "/pipelines/upload")) or (
            request.method == "GET" and request.path.endswith("/experiments")
        ):
            assert request.query.get("namespace") == [NS], (request.method, request.path)
        if request.method == "POST" and request.path.endswith("/experiments"):
            assert request.body["namespace"] == NS
        if request.method == "POST" and request.path.endswith(("/runs", "/recurringruns")):
            assert experiments[request.body["experiment_id"]]["namespace"] == NS
    assert json.dumps([r.headers for r in server.requests]).count("token-one") == len(server.requests)


def test_a_version_name_is_not_reused(server, capsys):
    _cli(server, capsys, "upload", "--name", "yolo", "--version", "v1", "--image", IMAGE)
    code = main(["upload", "--name", "yolo", "--version", "v1", "--image", IMAGE, "--host", server.url,
                 "--token-file", str(server.token_file), "--namespace", NS])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "already has a version 'v1'" in err[0]


def test_a_missing_version_or_pipeline_is_one_line(server, capsys):
    for args, message in ((["--pipeline", "nope", "--pipeline-version", "v1"], "no pipeline named 'nope'"),):
        code = main(["submit", *args, "--host", server.url, "--token-file", str(server.token_file), "--namespace", NS])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0]
    _cli(server, capsys, "upload", "--name", "yolo", "--version", "v1", "--image", IMAGE)
    code = main(["submit", "--pipeline", "yolo", "--pipeline-version", "v9", "--host", server.url,
                 "--token-file", str(server.token_file), "--namespace", NS])  # fmt: skip
    assert code == 2 and "has no version 'v9'" in capsys.readouterr().err


@pytest.mark.parametrize("cron", ["every monday", "0 3 * *", "0 3 * * 1; rm -rf /"])
def test_a_bad_cron_is_one_line(server, capsys, cron):
    code = main(["schedule", "--cron", cron, "--host", server.url, "--token-file", str(server.token_file),
                 "--namespace", NS])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--cron" in err[0]
    assert server.requests == []


def test_upload_refuses_run_parameters(server, capsys):
    code = main(["upload", "--name", "yolo", "--version", "v1", "--epochs", "3", "--host", server.url,
                 "--token-file", str(server.token_file)])  # fmt: skip
    assert code == 2 and "--epochs: upload stores the pipeline with its defaults" in capsys.readouterr().err


def test_a_token_file_is_read_again_when_it_changes(server, capsys):
    """A projected service-account token is rotated by the kubelet: --token-file is read before every
    request, so the requests after the rotation carry the new token."""

    def rotate(request) -> None:
        if request.method == "POST" and request.path.endswith("/runs"):
            server.token_file.write_text("token-two\n")

    server.on_request = rotate
    _cli(server, capsys, "submit", "--image", IMAGE, "--epochs", "3", "--wait", "--poll-interval", "0.01")
    tokens = [(r.method, r.path.rsplit("/", 1)[-1], r.headers["authorization"]) for r in server.requests]
    posted = next(i for i, (m, p, _) in enumerate(tokens) if m == "POST" and p == "runs")
    assert {t for *_, t in tokens[: posted + 1]} == {"Bearer token-one"}
    assert tokens[posted + 1 :] and {t for *_, t in tokens[posted + 1 :]} == {"Bearer token-two"}


def test_the_token_from_the_environment_and_never_on_the_workflow_command_line(tmp_path, monkeypatch, capsys):
    import yaml

    from tests.conftest import REPO

    state = submit_server.start()
    try:
        monkeypatch.setenv("KFP_TOKEN", "env-token")
        assert main(["submit", "--host", state.url, "--image", IMAGE, "--epochs", "3"]) == 0
        assert {r.headers["authorization"] for r in state.requests} == {"Bearer env-token"}
        assert "env-token" not in capsys.readouterr().out
    finally:
        state.stop()
    workflow = yaml.safe_load((REPO / ".github" / "workflows" / "retrain.yml").read_text())
    (step,) = [s for s in workflow["jobs"]["retrain"]["steps"] if "pipelines retrain" in s.get("run", "")]
    assert step["env"]["KFP_TOKEN"] == "${{ secrets.KFP_TOKEN }}"
    assert "--token" not in step["run"] and "KFP_TOKEN" not in step["run"].replace("# the token stays in the environment (KFP_TOKEN)", "")
