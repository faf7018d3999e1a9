"""The built image: its user, a step run without any network, its labels, and no build-time CA in it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.container_pipeline import writable_by_container
from tests.container_tools import IMAGE, docker, needs_image, sample_data

pytestmark = needs_image

# Extra CAs of the machine that built the image (a TLS-intercepting proxy's); the build sees them as a
# secret mount only, so none may end up in any certificate store of the image.
LOCAL_CA_DIR = Path("/usr/local/share/ca-certificates")


def test_runs_as_uid_1000_and_pid_1_is_the_init():
    result = docker("run", "--rm", "--network", "none", IMAGE, "sh", "-c", "id -u; cat /proc/1/cmdline")
    uid, cmdline = result.stdout.split("\n", 1)
    assert uid == "1000"
    assert "container-init" in cmdline.replace("\0", " ")


def test_validate_runs_without_network(tmp_path):
    data = sample_data(tmp_path / "data", train=8, val=4)
    out = writable_by_container(tmp_path / "out")
    script = (
        "yolo-pipeline validate --data /data/data.yaml --out /out/validate && "
        'echo interfaces: $(tail -n +3 /proc/net/dev | cut -d: -f1)'  # what this container could use
    )
    result = docker(
        "run", "--rm", "--network", "none", "-v", f"{data.parent}:/data:ro", "-v", f"{out}:/out",
        IMAGE, "sh", "-c", script,
    )  # fmt: skip
    assert result.stdout.splitlines()[-1] == "interfaces: lo"  # loopback only: no network at all
    report = json.loads((out / "validate" / "report.json").read_text())
    assert report["ok"] is True and report["splits"]["train"]["images_ok"] == 8
    assert (out / "validate" / "index").is_dir()


def test_labels_name_the_base_and_the_revision():
    labels = json.loads(docker("image", "inspect", "-f", "{{json .Config.Labels}}", IMAGE).stdout)
    assert labels["org.opencontainers.image.title"] == "yolo-pipeline"
    assert labels["org.opencontainers.image.base.name"]
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", labels["org.opencontainers.image.base.digest"])
    assert labels["org.opencontainers.image.revision"] != ""


def _pem_bodies(text: str) -> set[str]:
    return {
        "".join(m.split())
        for m in re.findall(r"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", text, re.S)
    }


def test_no_build_machine_ca_in_the_image():
    local = set()
    for path in sorted(LOCAL_CA_DIR.glob("*.crt")) if LOCAL_CA_DIR.is_dir() else []:
        local |= _pem_bodies(path.read_text(errors="replace"))
    if not local:
        pytest.skip(f"this machine has no extra CA in {LOCAL_CA_DIR} to look for")
    # Every certificate store in the image: the system bundle and any cacert.pem (certifi, pip's copy).
    stores = docker(
        "run", "--rm", "--network", "none", IMAGE, "sh", "-c",
        "find / -xdev \\( -name cacert.pem -o -name '*.crt' -o -name '*.pem' \\) -type f 2>/dev/null "
        "| xargs cat 2>/dev/null",
    ).stdout  # fmt: skip
    image_certs = _pem_bodies(stores)
    assert len(image_certs) > 50  # it did read the stores
    assert not local & image_certs
    env = json.loads(docker("image", "inspect", "-f", "{{json .Config.Env}}", IMAGE).stdout)
    assert not [e for e in env if e.split("=")[0] in ("PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")]
