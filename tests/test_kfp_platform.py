"""Issue 15: the pipeline as a platform team runs it — versions, volumes, templates, concurrent runs.

Against the loopback KFP stand-in (tests/submit_server.py) where a server is needed.
"""

from __future__ import annotations

import inspect
from importlib.metadata import version

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from pipelines.__main__ import main
from tests import submit_server
from tests.conftest import REPO

kfp = pytest.importorskip("kfp")
tomllib = pytest.importorskip("tomllib")  # Python 3.11+

IMAGE = "ghcr.io/yolo-pipeline/yolo-pipeline:3f2a9c1"


# ------------------------------------------------------------------------ fix 5: versions of kfp and KFP
def _pipeline_extra() -> dict[str, Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {r.name: r for r in map(Requirement, project["optional-dependencies"]["pipeline"])}


def test_kfp_and_kfp_kubernetes_are_pinned_to_the_versions_whose_features_are_used():
    """use_secret_as_env(optional=...) exists from kfp-kubernetes 2.15: a lower floor installs an SDK
    that cannot compile the pipeline (or a backend-era mismatch that leaves pods hanging)."""
    from kfp import kubernetes

    extra = _pipeline_extra()
    for name in ("kfp", "kfp-kubernetes"):
        spec = extra[name].specifier
        assert not spec.contains("2.14.6"), f"{name} {spec} allows a release without optional secrets"
        assert spec.contains("2.15.0") and spec.contains(version(name)), (name, spec)
        assert not spec.contains("3.0.0"), f"{name} {spec}: a major release may change the IR"
    assert "optional" in inspect.signature(kubernetes.use_secret_as_env).parameters
    assert Version(version("kfp-kubernetes")) >= Version("2.15")


def _submit(state, *extra: str) -> int:
    return main(["submit", "--host", state.url, "--image", IMAGE, "--epochs", "3", *extra])


@pytest.mark.parametrize(
    ("backend", "extra", "refused_for"),
    [
        ("2.14.0", (), "2.15.0"),  # the optional S3 secret
        ("v2.14.6", (), "2.15.0"),
        ("2.4.1", ("--s3-secret", ""), "2.5.0"),  # no secret: still the retry policy
    ],
)
def test_submit_refuses_a_backend_older_than_the_pipeline_needs(capsys, backend, extra, refused_for):
    state = submit_server.start(version=backend)
    try:
        assert _submit(state, *extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        assert f"older than {refused_for}" in err[0] and backend.lstrip("v") in err[0]
        assert ("optional S3 secret" if refused_for == "2.15.0" else "retry policy") in err[0]
        assert not state.created_runs()
    finally:
        state.stop()


@pytest.mark.parametrize(("backend", "extra"), [("2.15.0", ()), ("2.14.0", ("--s3-secret", "")), ("2.17.3", ())])
def test_submit_accepts_a_backend_that_has_what_the_pipeline_needs(backend, extra):
    state = submit_server.start(version=backend)
    try:
        assert _submit(state, *extra) == 0
        assert len(state.created_runs()) == 1
    finally:
        state.stop()


def test_submit_warns_when_the_backend_does_not_say_its_version(capsys):
    state = submit_server.start(version="")
    try:
        assert _submit(state) == 0
        assert "did not say its KFP version" in capsys.readouterr().err
        assert len(state.created_runs()) == 1
    finally:
        state.stop()
