"""`python -m pipelines upload` and `schedule`: pipeline versions and recurring runs on a KFP cluster.

upload   compiles the pipeline for a pinned image and cluster shape (as submit does) and stores it as
         version VERSION of pipeline NAME (kfp.Client: upload_pipeline for a new pipeline, then
         upload_pipeline_version). `submit --pipeline NAME --pipeline-version VERSION` runs it.
schedule creates a recurring run (a cron schedule) of a stored version, or of the pipeline compiled now.
         The dataset rev is NOT pinned to a commit here: each scheduled run resolves it when it starts
         (a branch moves on; that is what a schedule is for), and import_data's cache still keys on the SHA.
Both go through submit's checks: healthz, the token, the namespace, the backend version, the parameters.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

from pipelines import submit as sub
from yolo.errors import UserError

CRON_FIELD = re.compile(r"^[0-9A-Za-z*?/,#-]+$")


def cron_expression(text: str) -> str:
    """A cron expression as KFP takes it (6 fields, seconds first); 5 fields get `0` seconds."""
    fields = text.split()
    if len(fields) == 5:
        fields = ["0", *fields]
    if len(fields) != 6 or not all(CRON_FIELD.match(f) for f in fields):
        raise UserError(f"--cron {text!r}: expected 5 or 6 cron fields, e.g. '0 3 * * 1' (03:00 every Monday)")
    return " ".join(fields)


# ------------------------------------------------------------------------------------------ upload
def upload(request: sub.SubmitRequest, name: str, version: str, description: str = "") -> tuple[str, str]:
    """Compile and store as version `version` of pipeline `name`; returns (pipeline id, version id)."""
    token, health = sub.connect(request)
    stored = sub.SubmitRequest(**{**vars(request), "pipeline": name, "pipeline_version": None})
    with tempfile.TemporaryDirectory(prefix="yolo-upload-") as tmp:
        target = sub.prepare_target(stored, token, health, Path(tmp))
        with sub.quiet_kfp():
            try:
                client = sub.kfp_client(request, token)
                pipeline_id = sub.find_pipeline(client, stored)
                if pipeline_id is not None:
                    existing = client.list_pipeline_versions(pipeline_id, filter=sub._name_filter(version))
                    if existing.pipeline_versions:
                        raise UserError(f"{request.host}: pipeline {name!r} already has a version {version!r} "
                                        "(versions are kept as uploaded: choose a new version name)")  # fmt: skip
                else:
                    created = client.upload_pipeline(str(target.package), pipeline_name=name,
                                                     description=description or None,
                                                     namespace=request.namespace)  # fmt: skip
                    pipeline_id = created.pipeline_id
                stored_version = client.upload_pipeline_version(str(target.package), version,
                                                                pipeline_id=pipeline_id,
                                                                description=description or None)  # fmt: skip
            except sub.api_errors() as e:
                raise sub._api_error(e, request.host, token) from None
    return pipeline_id, stored_version.pipeline_version_id


# ---------------------------------------------------------------------------------------- schedule
def schedule(request: sub.SubmitRequest, cron: str, name: str, max_concurrency: int = 1) -> str:
    """A recurring run of the stored version (or of the pipeline compiled now); returns its id."""
    cron = cron_expression(cron)
    if max_concurrency < 1:
        raise UserError(f"--max-concurrency {max_concurrency}: must be >= 1")
    token, health = sub.connect(request)
    with tempfile.TemporaryDirectory(prefix="yolo-schedule-") as tmp:
        target = sub.prepare_target(request, token, health, Path(tmp))
        values = sub.checked_values(request, target.package, log=lambda line: None, pin_rev=False)
        experiment = request.experiment or sub.DEFAULT_EXPERIMENT
        source = ({"pipeline_id": target.pipeline_id, "version_id": target.version_id} if target.version_id
                  else {"pipeline_package_path": str(target.package)})  # fmt: skip
        with sub.quiet_kfp():
            try:
                client = sub.kfp_client(request, token)
                experiment_id = client.create_experiment(experiment, namespace=request.namespace).experiment_id
                recurring = client.create_recurring_run(
                    experiment_id, name, cron_expression=cron, max_concurrency=max_concurrency, no_catchup=True,
                    params=values, service_account=request.cluster.get("service_account") or None, **source,
                )  # fmt: skip
            except sub.api_errors() as e:
                raise sub._api_error(e, request.host, token) from None
    if not recurring.recurring_run_id:
        raise UserError(f"{request.host}: KFP API created a recurring run but returned no id")
    return recurring.recurring_run_id


# --------------------------------------------------------------------------------------------- CLI
def _parameters_given(args: argparse.Namespace) -> list[str]:
    given = [sub.flag(n) for n, _ in sub.PIPELINE_FLAGS if getattr(args, n, None) is not None]
    return given + (["--param"] if args.param else []) + (["--pipeline-version"] if args.pipeline_version else [])


def add_parser(subparsers) -> None:
    """Register `upload` and `schedule` on the `python -m pipelines` subparsers."""
    u = subparsers.add_parser("upload", help="compile and store the pipeline as a named version on a KFP cluster")
    u.add_argument("--name", required=True, help="pipeline name (created on first upload)")
    u.add_argument("--version", required=True, help="version name (new for each upload)")
    u.add_argument("--description", default="", help="shown in the KFP UI")
    sub.add_connection_arguments(u)
    sub.add_pipeline_arguments(u)
    u.set_defaults(handler=run_upload)

    s = subparsers.add_parser("schedule", help="create a recurring run (cron) of a stored or compiled pipeline")
    s.add_argument("--cron", required=True, help="cron expression, 5 fields (or 6, seconds first)")
    s.add_argument("--schedule-name", default="yolo-training (scheduled)", help="display name")
    s.add_argument("--max-concurrency", type=int, default=1, help="runs of the schedule at once (1)")
    sub.add_connection_arguments(s)
    sub.add_pipeline_arguments(s)
    s.set_defaults(handler=run_schedule)


def run_upload(args: argparse.Namespace) -> int:
    given = _parameters_given(args)
    if given:
        raise UserError(f"{given[0]}: upload stores the pipeline with its defaults; give parameters to "
                        "submit or schedule")  # fmt: skip
    request = sub.request_from_args(args)
    pipeline_id, version_id = upload(request, args.name, args.version, args.description)
    print(f"pipeline_id: {pipeline_id}")
    print(f"version_id: {version_id}")
    return 0


def run_schedule(args: argparse.Namespace) -> int:
    request = sub.request_from_args(args)
    recurring_id = schedule(request, args.cron, args.schedule_name, args.max_concurrency)
    print(f"recurring_run_id: {recurring_id}")
    print(f"url: {sub.redact(request.host.rstrip('/'))}/#/recurringrun/details/{recurring_id}", file=sys.stdout)
    return 0
