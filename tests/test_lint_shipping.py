"""The Dockerfile and the CI workflows lint clean (hadolint, actionlint from the dev extras)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = shutil.which(name, path=f"{BIN}:{os.environ.get('PATH', '')}")
    if path is None:
        pytest.skip(f"{name} is not installed (dev extras)")
    return path


def test_hadolint_reports_nothing():
    proc = subprocess.run([_tool("hadolint"), "Dockerfile"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "", proc.stdout + proc.stderr


def test_actionlint_reports_nothing():
    workflows = sorted((REPO / ".github" / "workflows").glob("*.yml"))
    assert {w.name for w in workflows} >= {"ci.yml", "image.yml", "retrain.yml"}
    proc = subprocess.run([_tool("actionlint"), *map(str, workflows)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "", proc.stdout + proc.stderr


def test_dockerfile_runs_as_non_root_with_exec_entrypoint():
    text = (REPO / "Dockerfile").read_text()
    users = [line.split()[1] for line in text.splitlines() if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    entry = [line for line in text.splitlines() if line.startswith("ENTRYPOINT")]
    # exec form, and an init that passes stop signals on to the step (tests/test_container_preemption.py)
    assert entry == ['ENTRYPOINT ["/usr/local/bin/container-init"]']
    assert "org.opencontainers.image.revision" in text
