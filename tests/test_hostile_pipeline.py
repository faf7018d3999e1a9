"""Hostile inputs to the pipeline tools (submit, retrain) and the components: no command runs, no file
leaks out of a dataset, no token crosses plain http, no credential is echoed, no flag is redirected.

Every payload is built here; every refusal is asserted as one line (exit 2 for the CLIs, a UserError in
the components) and by its effect: the marker file a command would have created does not exist.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from components import datasets, runtime, sources
from components.params import PIPELINE_TRAIN_FLAGS, check_parameters, check_train_extra_args
from components.sources import redact, resolve_git_rev
from pipelines import retrain
from pipelines import submit as sub
from tests import submit_server
from tests.conftest import REPO
from yolo.errors import UserError

pytest_plugins = ("tests.s3_server",)
pytest.importorskip("kfp")

IMAGE = "ghcr.io/yolo-pipeline/yolo-pipeline:3f2a9c1"
TOKEN = "s3cr3t-t0ken-value"
PASSWORD = "hunter2-password"
GIT = ("git", "-c", "user.name=test", "-c", "user.email=test@example.com")


class FakeArtifact:
    def __init__(self, path: Path):
        self.path = str(path)
        self.metadata: dict = {}


def _pipelines(*args: str, cwd: Path = REPO, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    )
    return subprocess.run(
        [sys.executable, "-m", "pipelines", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(
        [*GIT, "-C", str(repo), *args], capture_output=True, text=True, check=True
    ).stdout.strip()


def upload_pack(marker: Path) -> str:
    """A repository 'URL' that git reads as an option: runs `touch MARKER` as the upload-pack program."""
    return f"--upload-pack=touch {marker};false"


@pytest.fixture(scope="module")
def server():
    state = submit_server.start()
    yield state
    state.stop()


# ------------------------------------------------------------------------- command injection (finding 1)
def test_the_upload_pack_payload_is_live_when_git_gets_it_as_an_option(tmp_path):
    """The payload the refusals below are tested with really runs a command when passed as git passes it
    (so their 'no marker' assertions can fail)."""
    marker = tmp_path / "MARKER"
    subprocess.run(["git", "ls-remote", upload_pack(marker), "HEAD"], cwd=tmp_path, capture_output=True)
    assert marker.exists()


@pytest.mark.parametrize(
    "repository",
    [
        "{upload_pack}",
        "ext::sh -c touch% {marker}",  # git's ext transport runs a command by design
        "ssh://-oProxyCommand=touch%20{marker}/repo",  # an ssh host read as an ssh option
        "-oProxyCommand=touch {marker}:repo",  # scp form beginning with '-'
        "git@host:-u{marker}",  # scp path beginning with '-'
        "fd::17",  # another transport helper
        "http://example.invalid/repo.git",  # not on the allow-list (plain http)
        "ftp://example.invalid/repo.git",
        "/tmp/repo\n--upload-pack=touch {marker}",  # a newline
    ],
)
def test_component_refuses_hostile_dvc_repositories(tmp_path, monkeypatch, repository):
    """The resolve step (check_parameters, then resolve_version) and import_data refuse the source in
    one line before git or dvc start: the marker is never created."""
    marker = tmp_path / "MARKER"
    source = "dvc://" + repository.format(upload_pack=upload_pack(marker), marker=marker) + "#data"
    monkeypatch.chdir(tmp_path)  # where the payload's relative parts would resolve
    with pytest.raises(UserError) as refused:
        check_parameters(dataset_source=source, imgsz=64, epochs=1, batch_size=1)
    assert "\n" not in str(refused.value)
    with pytest.raises(UserError):
        datasets.resolve_version(source, "")
    with pytest.raises(UserError):
        datasets.import_data(source, "a" * 40, FakeArtifact(tmp_path / "dataset"))
    assert not marker.exists() and not (tmp_path / "dataset").exists()


@pytest.mark.parametrize("rev", ["--upload-pack=touch {marker}", "--output={marker}", "main\n--all", "a b"])
def test_hostile_revs_and_paths_are_refused(tmp_path, rev):
    marker = tmp_path / "MARKER"
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "main")
    _git(repo, "commit", "-q", "--allow-empty", "-m", "one")
    with pytest.raises(UserError, match="not a git rev"):
        resolve_git_rev(str(repo), rev.format(marker=marker))
    for path in ("--help", "data/../../etc"):
        with pytest.raises(UserError, match="must not"):
            sources.parse_source(f"dvc://{repo}#{path}")
    assert not marker.exists()
    assert resolve_git_rev(str(repo), "main") == _git(repo, "rev-parse", "main")  # a plain rev still works


def test_submit_refuses_the_injection_before_git_runs(tmp_path, server):
    marker = tmp_path / "MARKER"
    runs = len(server.created_runs())
    proc = _pipelines(
        "submit",
        "--host",
        server.url,
        "--token",
        TOKEN,
        "--image",
        IMAGE,
        "--dataset-source",
        f"dvc://{upload_pack(marker)}#data",
        cwd=tmp_path,  # where the payload's relative parts would resolve
    )
    line = _one_error_line(proc)
    assert "must not begin with '-'" in line and line.startswith("python -m pipelines submit: error:")
    assert not marker.exists() and len(server.created_runs()) == runs


def test_retrain_refuses_the_injection_from_the_production_params_file(tmp_path, server):
    marker = tmp_path / "MARKER"
    repo = tmp_path / "project"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "main")
    production = {
        "parameters": {"dataset-source": f"dvc://{upload_pack(marker)}#data/coco", "epochs": 3},
    }
    for name, text in {
        "data/coco.dvc": "outs:\n- md5: aaa.dir\n  path: coco\n",
        "pipelines/production.yaml": yaml.safe_dump(production),
    }.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(text)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "hostile params")
    runs = len(server.created_runs())
    proc = _pipelines(
        "retrain", "--repo", str(repo), "--host", server.url, "--token", TOKEN, "--image", IMAGE
    )
    assert proc.stdout.startswith("retrain: submit:")  # it decided to submit, then refused the source
    line = _one_error_line(proc)
    assert "must not begin with '-'" in line
    assert not marker.exists() and len(server.created_runs()) == runs
    assert not _git(repo, "tag", "-l", retrain.DEFAULT_TAG)  # nothing recorded as submitted


def test_pytorchjob_refuses_the_injection_before_git_runs(tmp_path):
    marker = tmp_path / "MARKER"
    out = tmp_path / "job.yaml"
    proc = _pipelines(
        "pytorchjob", "--nodes", "2", "--gpus", "1", "--checkpoint-uri", "s3://b/c", "--out", str(out),
        "--dataset-source", f"dvc://{upload_pack(marker)}#data", cwd=tmp_path,
    )  # fmt: skip
    assert "must not begin with '-'" in _one_error_line(proc)
    assert not marker.exists() and not out.exists()


def test_retrain_options_never_reach_git_as_options(tmp_path):
    repo = tmp_path / "project"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "main")
    _git(repo, "commit", "-q", "--allow-empty", "-m", "one")
    with pytest.raises(UserError, match="must not begin with '-'"):
        retrain.decide(repo, base="--output=/tmp/x")
    proc = _pipelines(
        "retrain", "--repo", str(repo), "--host", "http://127.0.0.1:1", "--tag=--delete", "--dry-run"
    )
    assert "--tag '--delete': must not begin with '-'" in _one_error_line(proc)


def test_cluster_values_from_a_params_file_stay_values():
    with pytest.raises(UserError, match="cluster s3_secret '--out=/etc/x': must not begin with '-'"):
        sub._cluster_args({"s3_secret": "--out=/etc/x"})
    with pytest.raises(UserError, match="control characters"):
        sub._cluster_args({"node_selector": {"pool": "gpu\n--out"}})


# -------------------------------------------------------------------------- symlinks out of a dataset (4)
def _dataset_with_links(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "dataset"
    (root / "images" / "train").mkdir(parents=True)
    (root / "labels" / "train").mkdir(parents=True)
    (root / "images" / "train" / "a.jpg").write_bytes(b"jpg-a")
    (root / "labels" / "train" / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (root / "data.yaml").write_text(
        yaml.safe_dump({"train": "images/train", "val": "images/train", "names": ["x"]})
    )
    private = tmp_path / "home" / ".ssh" / "id_rsa"
    private.parent.mkdir(parents=True)
    private.write_text("-----BEGIN PRIVATE KEY----- do not copy me\n")
    (root / "images" / "train" / "id_rsa.jpg").symlink_to(private)  # a file outside the dataset
    (root / "labels" / "train" / "ssh").symlink_to(private.parent)  # a folder outside
    (root / "images" / "train" / "b.jpg").symlink_to(root / "images" / "train" / "a.jpg")  # inside: kept
    (root / "images" / "train" / "loop").symlink_to(root / "images")  # back to an ancestor
    (root / "labels" / "train" / "gone.txt").symlink_to(tmp_path / "nowhere")  # dangling
    os.mkfifo(root / "images" / "train" / "pipe.jpg")  # reading it would block forever
    return root, private


def test_local_import_copies_only_what_lies_inside_the_dataset(tmp_path, caplog):
    root, private = _dataset_with_links(tmp_path)
    version = datasets.resolve_version(str(root))  # terminates: no loop, the FIFO is not read
    artifact = FakeArtifact(tmp_path / "artifact")
    with caplog.at_level("WARNING", logger="components.datasets"):
        meta = datasets.import_data(str(root), version, artifact)
    copied = Path(artifact.path)
    files = sorted(p.relative_to(copied).as_posix() for p in copied.rglob("*") if p.is_file())
    assert files == ["data.yaml", "images/train/a.jpg", "images/train/b.jpg", "labels/train/a.txt"]
    assert not any(p.is_symlink() for p in copied.rglob("*"))
    assert (copied / "images" / "train" / "b.jpg").read_bytes() == b"jpg-a"  # a link inside is followed
    secret = private.read_bytes()
    assert all(secret not in p.read_bytes() for p in copied.rglob("*") if p.is_file())
    assert meta["skipped"] == 5 and meta["files"] == 4
    (warning,) = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert (
        "skipped 5 path(s)" in warning
        and "images/train/id_rsa.jpg (a link to outside the dataset)" in warning
    )


def test_s3_keys_that_climb_out_are_one_line(s3_env, s3_bucket, tmp_path):
    import boto3

    client = boto3.client("s3")
    client.put_object(Bucket=s3_bucket, Key="datasets/evil/data.yaml", Body=b"names: [x]\n")
    client.put_object(Bucket=s3_bucket, Key="datasets/evil/../../escaped.txt", Body=b"outside")
    uri = f"s3://{s3_bucket}/datasets/evil"
    target = tmp_path / "work" / "dataset"
    with pytest.raises(UserError, match=r"object key '\.\./\.\./escaped\.txt' is not a plain relative path"):
        datasets.import_data(uri, "s3-x", FakeArtifact(target))
    assert not any(tmp_path.rglob("escaped.txt"))


# ------------------------------------------------------------------------ the token over plain http (5)
def test_token_is_not_sent_over_plain_http_to_another_machine(tmp_path, server):
    # 0.0.0.0 reaches this machine's stand-in, but is not a loopback name: it stands for a remote host.
    remote = server.url.replace("127.0.0.1", "0.0.0.0")
    before = len(server.requests)
    proc = _pipelines("submit", "--host", remote, "--token", TOKEN, "--image", IMAGE, "--epochs", "1")
    line = _one_error_line(proc)
    assert "refusing to send the bearer token over plain http" in line and "--insecure" in line
    assert len(server.requests) == before  # nothing was sent at all
    assert TOKEN not in proc.stderr + proc.stdout

    assert sub.check_token_transport(remote, None, insecure=False) is None  # no token: nothing to protect
    assert sub.check_token_transport("https://kf.example.com", TOKEN, insecure=False) is None
    for loopback in ("http://localhost:8888", "http://127.0.0.1:8888", "http://[::1]:8888"):
        assert sub.check_token_transport(loopback, TOKEN, insecure=False) is None
    warning = sub.check_token_transport(remote, TOKEN, insecure=True)
    assert warning.startswith("warning: sending the bearer token over plain http") and TOKEN not in warning


def test_insecure_sends_it_with_a_warning(server):
    remote = server.url.replace("127.0.0.1", "0.0.0.0")
    proc = _pipelines(
        "submit", "--host", remote, "--token", TOKEN, "--image", IMAGE, "--epochs", "1", "--insecure"
    )
    assert proc.returncode == 0, proc.stderr
    assert (
        proc.stderr.splitlines()[0]
        == f"warning: sending the bearer token over plain http to {remote} (--insecure)"
    )
    assert server.requests[-1].headers.get("authorization") == f"Bearer {TOKEN}"


# ------------------------------------------------------------------ credentials in messages (7)
def test_redact_hides_url_credentials_and_signed_queries():
    assert (
        redact(f"https://user:{PASSWORD}@git.example.com/org/r.git")
        == "https://***@git.example.com/org/r.git"
    )
    assert redact(f"s3://AKIAX:{PASSWORD}@bucket/p and more") == "s3://***@bucket/p and more"
    assert redact(f"x https://u:p@ss{PASSWORD}@h/a@b y") == "x https://***@h/a@b y"
    signed = f"https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIAX&X-Amz-Signature={PASSWORD}&a=1"
    assert redact(signed) == "https://b.s3.amazonaws.com/k?X-Amz-Credential=***&X-Amz-Signature=***&a=1"
    assert redact("git@github.com:org/r.git https://h/p") == "git@github.com:org/r.git https://h/p"


def test_credentials_in_a_source_are_not_echoed(tmp_path, server):
    source = f"dvc://https://user:{PASSWORD}@127.0.0.1:1/repo.git#data"  # nobody listens on port 1
    proc = _pipelines(
        "submit", "--host", server.url, "--token", TOKEN, "--image", IMAGE, "--dataset-source", source
    )
    line = _one_error_line(proc)
    assert "https://***@127.0.0.1:1/repo.git" in line and PASSWORD not in proc.stderr + proc.stdout
    with pytest.raises(UserError) as refused:
        datasets.resolve_version(source, "")
    assert PASSWORD not in str(refused.value)
    with pytest.raises(UserError) as refused:
        check_parameters(
            dataset_source="sample:",
            imgsz=64,
            epochs=1,
            batch_size=1,
            registry_uri=f"ftp://u:{PASSWORD}@host/registry",
        )
    assert PASSWORD not in str(refused.value) and "ftp://***@host/registry" in str(refused.value)
    proc = _pipelines("submit", "--host", f"https://u:{PASSWORD}@127.0.0.1:1", "--image", IMAGE)
    line = _one_error_line(proc)
    assert PASSWORD not in line and "no credentials in the URL (pass the token with --token)" in line


# --------------------------------------------------------------------- extra_args redirecting flags (7)
@pytest.mark.parametrize(
    "extra",
    [
        "--out /tmp/elsewhere",
        "--checkpoint-uri=s3://attacker/ckpt",
        "--seed 1 --weights https://evil/w.pt",
        "--resume s3://attacker/last.pt",
        "--data /etc/data.yaml",
        "--img 1280",
    ],
)
def test_extra_args_may_not_replace_flags_the_pipeline_sets(extra, tmp_path, monkeypatch):
    flag = next(a.split("=")[0] for a in extra.split() if a.split("=")[0] in PIPELINE_TRAIN_FLAGS)
    with pytest.raises(UserError, match=f"train_extra_args: {flag} is set by the pipeline"):
        check_parameters(dataset_source="sample:", imgsz=64, epochs=1, batch_size=1, train_extra_args=extra)
    calls: list = []
    monkeypatch.setattr(runtime, "run_yolo", lambda *a, **k: calls.append(a))
    with pytest.raises(UserError, match="is set by the pipeline"):
        _train(tmp_path, extra)
    assert calls == []  # refused before `yolo train` started


def _train(tmp_path: Path, extra: str) -> float:
    dataset = FakeArtifact(tmp_path / "ds")
    dataset.metadata = {"version": "v1", "data_yaml": "data.yaml"}
    return runtime.train(
        dataset,
        FakeArtifact(tmp_path / "idx"),
        FakeArtifact(tmp_path / "st"),
        "yolov5n.yaml",
        "w.pt",
        1,
        64,
        8,
        2,
        2,
        "s3://b/ckpt",
        "job",
        extra,
        FakeArtifact(tmp_path / "m"),
        out_dir=str(tmp_path / "run"),
    )


def test_every_flag_the_train_step_sets_is_reserved(tmp_path, monkeypatch):
    """The reserved list cannot fall behind the step: every flag it passes to `yolo train` is on it."""
    seen: list[list[str]] = []

    def run_yolo(step, args, gpus=0, allowed_exit_codes=(0,), **_options):
        seen.append([str(a) for a in args])
        raise RuntimeError("stop here")

    monkeypatch.setattr(runtime, "run_yolo", run_yolo)
    with pytest.raises(RuntimeError, match="stop here"):
        _train(tmp_path, "--seed 3")
    flags = {a for a in seen[0] if a.startswith("--")} - {"--seed"}
    assert flags and flags <= set(PIPELINE_TRAIN_FLAGS), flags - set(PIPELINE_TRAIN_FLAGS)
    assert check_train_extra_args("--seed 1 --deterministic --hyp 'my hyp.yaml'") == [
        "--seed",
        "1",
        "--deterministic",
        "--hyp",
        "my hyp.yaml",
    ]
    with pytest.raises(UserError, match="No closing quotation"):
        check_train_extra_args("--hyp 'unclosed")


def test_submit_refuses_extra_args_that_redirect_output(server):
    runs = len(server.created_runs())
    proc = _pipelines("submit", "--host", server.url, "--image", IMAGE, "--train-extra-args", "--out /tmp/x")
    assert "train_extra_args: --out is set by the pipeline" in _one_error_line(proc)
    assert len(server.created_runs()) == runs
