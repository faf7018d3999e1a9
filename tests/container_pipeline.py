"""Run the compiled pipeline (its YAML) in the project image with kfp.local's DockerRunner, one container
per task, as the image's user (uid 1000). Used by the container tests (a child process each, so its log
and kfp.local's global settings stay its own):

    python -m tests.container_pipeline --pipeline pipeline.yaml --root DIR --params '{"epochs": 1, ...}'
        [--network none|host] [--env NAME=VALUE ...] [--label TAG] [--cache DIR]

Writes DIR/outputs.json: the pipeline outputs (path and metadata of each). DockerRunner quirks handled
here: the pipeline root must be writable by uid 1000 (made so), and a task whose auto-removed container
could not be waited on is reported as exit 0 (so the tests check every task's outputs themselves).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

LABEL = "yolo-pipeline-test"  # docker label on every task container: `docker ps --filter label=...`
CONTAINER_UID = 1000


def writable_by_container(path: Path) -> Path:
    """Create `path` owned by the image's user (the tests run as root; the steps as uid 1000)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        os.chown(path, CONTAINER_UID, CONTAINER_UID)
    else:
        path.chmod(0o777)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.container_pipeline")
    p.add_argument("--pipeline", type=Path, required=True, help="compiled pipeline YAML")
    p.add_argument("--root", type=Path, required=True, help="pipeline root, cache and outputs.json")
    p.add_argument("--params", default="{}", help="pipeline arguments as a JSON object")
    p.add_argument("--network", default="none", help="docker network of every task: none or host")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--label", default="e2e", help=f"value of the {LABEL} label on the task containers")
    p.add_argument("--cache", type=Path, help="kfp.local's cache folder (default ROOT/cache)")
    args = p.parse_args(argv)

    import kfp.local
    from kfp import components

    root = args.root.resolve()
    artifacts = writable_by_container(root / "artifacts")
    runner = kfp.local.DockerRunner(
        network_mode=args.network,
        environment=dict(item.split("=", 1) for item in args.env),
        labels={LABEL: args.label},
    )
    kfp.local.init(
        runner=runner,
        pipeline_root=str(artifacts),
        raise_on_error=True,
        enable_caching=True,
        cache_root=str((args.cache or root / "cache").resolve()),
    )
    pipeline = components.load_component_from_file(str(args.pipeline))
    run = pipeline(**json.loads(args.params))
    outputs = {name: {"path": a.path, "metadata": dict(a.metadata)} for name, a in run.outputs.items()}
    (root / "outputs.json").write_text(json.dumps(outputs, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
