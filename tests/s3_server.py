"""A real S3 endpoint on loopback (moto's threaded server) for tests, and fixtures around it.

Use in a test module:

    pytest_plugins = ("tests.s3_server",)   # fixtures: s3_server, s3_env, s3_bucket

    def test_x(s3_env, s3_bucket):          # AWS_* env points at the server; a fresh bucket name
        storage = open_storage(f"s3://{s3_bucket}/runs")

For a subprocess (the CLI), pass `env=s3_env`: the fixture's value is the full environment it set up.
`LoopbackS3` can also be started alone, e.g. to stop/restart a server on its port mid-test.
"""

from __future__ import annotations

import os
import socket
import uuid

import pytest

DUMMY_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    # Short waits so a test against a stopped server fails (or recovers) in seconds, not minutes.
    "YOLO_S3_CONNECT_TIMEOUT": "2",
    "YOLO_S3_READ_TIMEOUT": "10",
    "YOLO_S3_MAX_ATTEMPTS": "3",
}
# Anything that could point boto3 at real credentials or config on the machine running the tests.
UNSET_ENV = ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CA_BUNDLE")


class LoopbackS3:
    """moto's ThreadedMotoServer on 127.0.0.1; stop() frees the port so restart() can take it again."""

    def __init__(self, port: int = 0):
        self.port = port
        self._server = None

    def start(self) -> LoopbackS3:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        self.port = self._server.get_host_and_port()[1]
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.stop()
        # ThreadedMotoServer.stop() shuts the loop down but keeps the socket bound; close it so the
        # same port can be served again (the point of a restart test).
        inner = getattr(self._server, "_server", None)
        if inner is not None:
            inner.server_close()
        self._server = None

    def restart(self) -> LoopbackS3:
        """Start again on the same port (moto keeps its buckets in-process across restarts)."""
        self.stop()
        return self.start()

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """The environment a boto3 client (or a CLI subprocess) needs to use this server."""
        return {**DUMMY_ENV, "AWS_ENDPOINT_URL": self.endpoint_url}


def closed_port() -> int:
    """A loopback port with nothing listening (bound then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def apply_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for name in UNSET_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def make_bucket(env: dict[str, str], name: str | None = None) -> str:
    import boto3

    name = name or f"test-{uuid.uuid4().hex[:12]}"
    client = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    )
    client.create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def s3_server():
    server = LoopbackS3().start()
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch) -> dict[str, str]:
    """Point boto3 in this process at the loopback server; returns the variables (for subprocesses)."""
    env = s3_server.env()
    apply_env(monkeypatch, env)
    return dict(os.environ)


@pytest.fixture
def s3_bucket(s3_env) -> str:
    """A freshly created, uniquely named bucket on the loopback server."""
    return make_bucket(s3_env)
