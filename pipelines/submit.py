"""`python -m pipelines submit`: compile the pipeline for a pinned image and start a run on a KFP cluster.

Order of work, so that a mistake costs seconds: the host's healthz answers (short timeout: kfp.Client alone
retries healthz five times, 5 s apart) → the pipeline is compiled by the `compile` subcommand in a child
process (the component modules read the image when first imported, so a fresh interpreter is the one way
to pin it reliably) → parameters are merged (pipeline defaults < params file < flags < --param), typed by
the compiled spec and checked like every other entry point (components.params.check_parameters) → a
`dvc://` dataset rev is resolved to a commit SHA → kfp.Client(...).create_run_from_pipeline_package.

The token travels only in the Authorization header: it is never printed, logged, or made a parameter.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import ipaddress
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from components.params import PARAMETERS, check_parameters
from components.sources import check_argument, redact
from yolo.errors import UserError, did_you_mean

HEALTHZ_PATH = "/apis/v2beta1/healthz"
TOKEN_PATH_ENV = "KF_PIPELINES_SA_TOKEN_PATH"  # the kfp SDK's own variable: a file holding the token
TOKEN_ENV = "KFP_TOKEN"  # a token in the environment (CI): never on a command line
UI_HOST_ENV = "KF_PIPELINES_UI_ENDPOINT"  # the kfp SDK's own variable for run links
DEFAULT_EXPERIMENT = "yolo-pipeline"
PIPELINE_NAME = "yolo-training"  # pipelines.training.PIPELINE_NAME (not imported: it would import kfp)
REPO_ROOT = Path(__file__).resolve().parents[1]  # holds the `pipelines` package (for the compile child)
FINISHED_STATES = ("SUCCEEDED", "FAILED", "SKIPPED", "CANCELED", "CANCELLED")

# The pipeline function's parameters, as flags spelled like the CLI's (from the one schema, components.params).
PIPELINE_FLAGS: tuple[tuple[str, type], ...] = tuple((p.name, p.type) for p in PARAMETERS)
# Compile-time options (the pod shape): passed through to `python -m pipelines compile` unchanged.
CLUSTER_KEYS = (
    "gpus",
    "s3_secret",
    "s3_endpoint",
    "node_selector",
    "tolerations",
    "train_retries",
    "train_cpu",
    "train_memory",
    "train_cpu_limit",
    "train_memory_limit",
    "shm_size",
    "dataset_pvc",
    "image_pull_secrets",
    "nodes",
    "service_account",
    "resources",
)
DEFAULT_GPUS = 1  # `compile`'s default
PARAMS_FILE_KEYS = ("experiment", "namespace", "cluster", "parameters")
KIND_WORDS = {"NUMBER_INTEGER": "integer", "NUMBER_DOUBLE": "number", "BOOLEAN": "boolean (true/false)",
              "LIST": "JSON list", "STRUCT": "JSON object"}  # fmt: skip


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# ------------------------------------------------------------------------------------------ inputs
@dataclass
class ParamsFile:
    """A production parameters file: `experiment`, `cluster` (compile options), `parameters` (run)."""

    path: Path | None = None
    experiment: str | None = None
    namespace: str | None = None  # the profile namespace on multi-user Kubeflow
    cluster: dict[str, Any] = field(default_factory=dict)
    parameters: dict[str, Any] = field(default_factory=dict)


def _section(raw: Any, name: str, known: tuple[str, ...], path: Path) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: `{name}` must be a mapping of KEY: VALUE")
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name_ = str(key).replace("-", "_")
        if name_ not in known:
            spelled = [k.replace("_", "-") for k in known]
            raise UserError(f"{path}: unknown key `{key}` in `{name}`{did_you_mean(str(key), spelled)}")
        out[name_] = value
    return out


def load_params_file(path: str | os.PathLike) -> ParamsFile:
    """Read a parameters file (keys spelled like the flags, `-` or `_`); UserError naming file and key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping with {', '.join(PARAMS_FILE_KEYS)}")
    for key in raw:
        if key not in PARAMS_FILE_KEYS:
            raise UserError(
                f"{path}: unknown top-level key `{key}`{did_you_mean(str(key), PARAMS_FILE_KEYS)}"
            )
    experiment = raw.get("experiment")
    return ParamsFile(
        path=path,
        experiment=str(experiment) if experiment else None,
        namespace=str(raw["namespace"]) if raw.get("namespace") else None,
        cluster=_section(raw.get("cluster"), "cluster", CLUSTER_KEYS, path),
        parameters=_section(raw.get("parameters"), "parameters", tuple(n for n, _ in PIPELINE_FLAGS), path),
    )


PLACEHOLDER = re.compile(r"<[A-Za-z][A-Za-z0-9 _.-]*>")  # `<BUCKET>`: a template value left unfilled


def check_filled(params_file: ParamsFile, values: dict[str, Any]) -> None:
    """UserError (one line) when a value still holds a template placeholder such as `<BUCKET>`.

    pipelines/production.yaml ships as a template: a run submitted with `s3://<BUCKET>/...` would get as
    far as the train step before failing; this stops it before anything is compiled or sent."""
    for key, value in values.items():
        texts = value.values() if isinstance(value, dict) else value if isinstance(value, list) else [value]
        for text in texts:
            found = PLACEHOLDER.search(str(text)) if isinstance(text, str) else None
            if found:
                where = f"{params_file.path}: " if params_file.path else ""
                raise UserError(
                    f"{where}`{key.replace('_', '-')}` still holds the template placeholder {found[0]}: "
                    "fill in every <...> of the params file (or give the flag)"
                )


@dataclass
class SubmitRequest:
    """Everything one submission needs; `submit()` does the work."""

    host: str
    token: str | None = None
    token_file: str | None = None  # re-read before every request
    image: str | None = None
    experiment: str | None = None
    namespace: str | None = None
    run_name: str | None = None
    cluster: dict[str, Any] = field(default_factory=dict)  # compile options (CLUSTER_KEYS)
    parameters: dict[str, Any] = field(default_factory=dict)  # typed pipeline parameters
    raw_parameters: dict[str, str] = field(default_factory=dict)  # --param name=value, typed by the spec
    wait: bool = False
    insecure: bool = False  # allow the token over plain http to a host other than this machine
    wait_timeout: float = 3 * 24 * 3600.0
    poll_interval: float = 30.0
    connect_timeout: float = 5.0
    pipeline: str = PIPELINE_NAME  # with pipeline_version: the stored pipeline to run
    pipeline_version: str | None = None  # run this uploaded version instead of compiling


@dataclass
class SubmitResult:
    run_id: str
    url: str
    experiment: str
    image: str
    parameters: dict[str, Any]
    state: str | None = None  # with --wait: the final state


def token_file(given: str | os.PathLike | None) -> Path | None:
    """The token file: --token-file, else the one $KF_PIPELINES_SA_TOKEN_PATH names, else None."""
    path = given or os.environ.get(TOKEN_PATH_ENV)
    return Path(path) if path else None


def read_token_file(path: Path) -> str:
    """The token in `path` now (a projected token is rotated by the kubelet: read it again per request)."""
    try:
        value = path.read_text().strip()
    except OSError as e:
        raise UserError(f"{path}: cannot read the token file ({e.strerror})") from None
    if not value:
        raise UserError(f"{path}: the token file is empty")
    return value


def read_token(token: str | None, token_file_path: str | os.PathLike | None = None) -> str | None:
    """The bearer token now: --token-file, else --token, else $KFP_TOKEN, else the file
    $KF_PIPELINES_SA_TOKEN_PATH names, else None (no Authorization header)."""
    if token_file_path:
        return read_token_file(Path(token_file_path))
    if token:
        return token.strip()
    if os.environ.get(TOKEN_ENV, "").strip():
        return os.environ[TOKEN_ENV].strip()
    path = token_file(None)
    return read_token_file(path) if path else None


def token_path(request: SubmitRequest) -> Path | None:
    """The file the token comes from (read_token's order), or None when it is not from a file."""
    if request.token_file:
        return Path(request.token_file)
    if request.token or os.environ.get(TOKEN_ENV, "").strip():
        return None
    return token_file(None)


@contextlib.contextmanager
def quiet_kfp():
    """kfp prints its own links and a FutureWarning: stdout is for our results, stderr for one-line errors."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


def kfp_client(request: SubmitRequest, token: str | None):
    """kfp.Client for the request. A token from a file is read again before every request (a projected
    service-account token is rotated by the kubelet); any other token is sent as read once."""
    import kfp
    from kfp.client.set_volume_credentials import ServiceAccountTokenVolumeCredentials

    kwargs: dict[str, Any] = {"namespace": request.namespace} if request.namespace else {}
    path = token_path(request)
    if path is not None:
        kwargs["credentials"] = ServiceAccountTokenVolumeCredentials(path=str(path))
    else:
        kwargs["existing_token"] = token
    with quiet_kfp():
        return kfp.Client(host=request.host.rstrip("/"), **kwargs)


def api_errors() -> tuple[type[BaseException], ...]:
    import kfp_server_api
    import urllib3

    return (kfp_server_api.ApiException, urllib3.exceptions.HTTPError, OSError, ValueError)


# ------------------------------------------------------------------------------------------- image
def split_image(ref: str) -> tuple[str, str | None, str | None]:
    """`registry/name[:tag][@sha256:…]` → (name, tag, digest); UserError for what no registry accepts."""
    name, _, digest = ref.partition("@")
    tag = None
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name, tag = name.rsplit(":", 1)
    parts = name.split("/")
    host_ok = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?(:[0-9]+)?$")
    path_ok = re.compile(r"^[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*$")
    first_is_host = len(parts) > 1 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost")
    bad = (
        not name
        or (first_is_host and not host_ok.match(parts[0]))
        or any(not path_ok.match(p) for p in parts[1 if first_is_host else 0 :])
        or (tag is not None and not re.match(r"^[\w][\w.-]{0,127}$", tag))
        or (digest and not re.match(r"^sha256:[0-9a-f]{64}$", digest))
        or (not digest and "@" in ref)
    )
    if bad:
        raise UserError(
            f"--image {ref!r}: not an image reference (REGISTRY/NAME:TAG or REGISTRY/NAME@sha256:DIGEST)"
        )
    return name, tag, digest or None


def is_pinned(ref: str) -> bool:
    """A digest, or a tag other than `latest`: the run uses exactly the image that was tested."""
    _, tag, digest = split_image(ref)
    return bool(digest) or (tag is not None and tag != "latest")


def effective_image(image: str | None) -> str:
    from components import pipeline_image

    return image or pipeline_image()


# -------------------------------------------------------------------------------------------- host
def _is_loopback(hostname: str) -> bool:
    if hostname.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(hostname).is_loopback
    except ValueError:
        return False


def check_token_transport(host: str, token: str | None, insecure: bool) -> str | None:
    """Refuse to send a bearer token over plain http to another machine (anyone on the path could read
    it), unless --insecure; returns the warning to print then. Loopback (a kubectl port-forward) is fine:
    the token never leaves this machine."""
    parts = urlsplit(host)
    if not token or parts.scheme.lower() != "http" or _is_loopback(parts.hostname or ""):
        return None
    if not insecure:
        raise UserError(
            f"--host {redact(host)}: refusing to send the bearer token over plain http "
            "(use https://, a port-forward to localhost, or --insecure)"
        )
    return f"warning: sending the bearer token over plain http to {redact(host)} (--insecure)"


def check_host(host: str, token: str | None, timeout: float) -> dict[str, Any]:
    """GET HOST/apis/v2beta1/healthz once with a short timeout; UserError (one line) when it fails."""
    if not re.match(r"^https?://[^/\s]+", host):
        raise UserError(f"--host {redact(host)!r}: expected http://HOST[:PORT][/PATH] or https://...")
    if "@" in urlsplit(host).netloc:
        raise UserError(f"--host {redact(host)!r}: no credentials in the URL (pass the token with --token)")
    url = host.rstrip("/") + HEALTHZ_PATH
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            hint = "the token was refused" if token else f"pass --token or set {TOKEN_PATH_ENV}"
            raise UserError(
                f"{host}: authentication failed (HTTP {e.code} from {HEALTHZ_PATH}): {hint}"
            ) from None
        if e.code == 404:
            raise UserError(
                f"{host}: no KFP v2 API here (HTTP 404 for {HEALTHZ_PATH}); give the API root, e.g. "
                "http://localhost:8888 (port-forward of ml-pipeline) or https://KUBEFLOW/pipeline"
            ) from None
        raise UserError(f"{host}: KFP API answered HTTP {e.code} ({e.reason}) for {HEALTHZ_PATH}") from None
    except (urllib.error.URLError, OSError, ssl.SSLError) as e:
        reason = getattr(e, "reason", e)
        if isinstance(reason, (socket.timeout, TimeoutError)):
            reason = f"no answer within {timeout:g} s"
        raise UserError(f"{host}: KFP API unreachable ({reason})") from None
    try:
        info = json.loads(body or b"{}")
    except ValueError:
        raise UserError(
            f"{host}: {HEALTHZ_PATH} did not answer JSON (a login page? pass a token, or the API's own URL)"
        ) from None
    return info if isinstance(info, dict) else {}


# ----------------------------------------------------------------------------------------- compile
def _cluster_args(cluster: dict[str, Any]) -> list[str]:
    """The `compile` flags for the cluster options; each value checked to be a value, not an option."""
    args: list[str] = []
    for key, value in cluster.items():
        if value is None:
            continue
        if key == "node_selector":
            items = value.items() if isinstance(value, dict) else (str(v).split("=", 1) for v in value)
            for k, v in items:
                args += ["--node-selector", check_argument("cluster node_selector", f"{k}={v}")]
        elif key == "tolerations":
            for t in [value] if isinstance(value, str) else value:
                args += ["--toleration", check_argument("cluster toleration", str(t))]
        elif key == "resources":
            for spec in [value] if isinstance(value, str) else value:
                args += ["--resources", check_argument("cluster resources", str(spec))]
        elif key == "image_pull_secrets":
            for name in [value] if isinstance(value, str) else value:
                args += ["--image-pull-secret", check_argument("cluster image_pull_secret", str(name))]
        else:
            args += [flag(key), check_argument(f"cluster {key}", str(value))]
    return args


def compile_package(out: Path, image: str | None, cluster: dict[str, Any]) -> None:
    """`python -m pipelines compile --out OUT [--image I] [cluster flags]` in a fresh interpreter."""
    argv = [sys.executable, "-m", "pipelines", "compile", "--out", str(out), *_cluster_args(cluster)]
    if image:
        argv += ["--image", image]
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    )
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    if proc.returncode == 2:  # a bad option: compile said what, in one line
        line = (proc.stderr.strip().splitlines() or ["compile failed"])[-1]
        raise UserError(line.split(": error: ", 1)[-1])
    if proc.returncode != 0:
        raise RuntimeError(f"compiling the pipeline failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")


def root_parameters(package: Path) -> dict[str, dict[str, Any]]:
    """name → {parameterType, defaultValue?} of the compiled pipeline's inputs."""
    with package.open() as f:
        spec = next(yaml.safe_load_all(f))
    return spec["root"]["inputDefinitions"]["parameters"]


# ------------------------------------------------------------------------------------ backend version
# What a compiled pipeline needs from the KFP backend, found in its IR: (version, feature, why).
RETRY_NEEDS = ((2, 5, 0), "the train task's retry policy", "older backends never turn it into an Argo retry")
OPTIONAL_SECRET_NEEDS = (
    (2, 15, 0),
    "the optional S3 secret",
    "older backends ignore `optional` and leave pods without the secret in CreateContainerConfigError",
)


def backend_requirements(package: Path) -> list[tuple[tuple[int, int, int], str, str]]:
    """The backend features the compiled pipeline uses, each with the first KFP release that honours it."""
    with package.open() as f:
        docs = list(yaml.safe_load_all(f))
    needs = []
    tasks = docs[0].get("root", {}).get("dag", {}).get("tasks", {})
    if any("retryPolicy" in task for task in tasks.values()):
        needs.append(RETRY_NEEDS)
    platform = docs[1] if len(docs) > 1 and isinstance(docs[1], dict) else {}
    executors = platform.get("platforms", {}).get("kubernetes", {}).get("deploymentSpec", {}).get("executors", {})
    if any(s.get("optional") for e in executors.values() for s in e.get("secretAsEnv", [])):
        needs.append(OPTIONAL_SECRET_NEEDS)
    return needs


def backend_version(health: dict[str, Any]) -> tuple[int, int, int] | None:
    """healthz's `tag_name` (e.g. 2.15.0, v2.15.0, 2.15.0-rc.1) as numbers; None for a dev build or none."""
    match = re.match(r"^v?(\d+)\.(\d+)(?:\.(\d+))?", str(health.get("tag_name") or ""))
    if not match:
        return None
    return int(match[1]), int(match[2]), int(match[3] or 0)


def check_backend(host: str, health: dict[str, Any], package: Path) -> str | None:
    """UserError (one line) when the backend is older than the pipeline needs; a warning when unknown."""
    needs = backend_requirements(package)
    if not needs:
        return None
    version, feature, why = max(needs)
    wanted = ".".join(map(str, version))
    have = backend_version(health)
    if have is None:
        return (f"warning: {redact(host)} did not say its KFP version (healthz tag_name "
                f"{health.get('tag_name')!r}); this pipeline needs >= {wanted} for {feature}")
    if have < version:
        raise UserError(
            f"{host}: KFP backend {'.'.join(map(str, have))} is older than {wanted}, which this pipeline "
            f"needs for {feature} ({why}); upgrade KFP, or compile without it"
        )
    return None


def _typed(name: str, text: str, kind: str) -> Any:
    try:
        if kind == "NUMBER_INTEGER":
            return int(text)
        if kind == "NUMBER_DOUBLE":
            return float(text)
        if kind == "BOOLEAN":
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("true", "1", "yes")
        if kind in ("LIST", "STRUCT"):
            return json.loads(text)
    except ValueError:
        raise UserError(
            f"parameter {name}={text}: not a valid {KIND_WORDS.get(kind, kind.lower())}"
        ) from None
    return text


def merge_parameters(spec: dict[str, dict[str, Any]], request: SubmitRequest) -> dict[str, Any]:
    """Pipeline defaults < request.parameters < --param, every value typed as the spec declares."""
    values = {name: p.get("defaultValue") for name, p in spec.items() if "defaultValue" in p}
    for name, value in request.parameters.items():
        if name not in spec:
            raise UserError(f"pipeline has no parameter `{name}`{did_you_mean(name, spec)}")
        values[name] = value
    for name, text in request.raw_parameters.items():
        if name not in spec:
            raise UserError(f"--param {name}: the pipeline has no such parameter{did_you_mean(name, spec)}")
        values[name] = _typed(name, text, spec[name]["parameterType"])
    for name, p in spec.items():  # YAML may hand `epochs: 300.0` or `imgsz: "640"`
        kind, value = p["parameterType"], values.get(name)
        if value is None:  # `weights:` left empty in YAML
            if kind == "STRING" and name in values:
                values[name] = ""
            continue
        if kind == "NUMBER_INTEGER" and not isinstance(value, bool):
            if isinstance(value, float) and not value.is_integer():
                raise UserError(f"parameter {name}={value}: must be an integer")
            values[name] = _typed(name, str(int(float(value))), kind)
        elif kind == "NUMBER_DOUBLE":
            values[name] = _typed(name, str(value), kind)
        elif kind == "STRING":
            values[name] = str(value)
    missing = [n for n, p in spec.items() if n not in values and not p.get("isOptional")]
    if missing:
        raise UserError(f"pipeline parameters without a value: {', '.join(missing)}")
    return values


def resolve_dataset_rev(values: dict[str, Any]) -> str | None:
    """For a dvc:// source, replace the rev (branch, tag, '' = HEAD) by its commit SHA; returns the note."""
    from components.sources import parse_source, resolve_git_rev

    source = parse_source(str(values.get("dataset_source", "")))
    rev = str(values.get("dataset_rev") or "")
    if source.kind != "dvc":
        if rev:
            raise UserError(f"--dataset-rev {rev!r}: only a dvc:// dataset source has a rev")
        return None
    sha = resolve_git_rev(source.location, rev)
    values["dataset_rev"] = sha
    return f"dataset rev {rev or 'HEAD'!r} of {redact(source.location)} → {sha}"


def check_values(values: dict[str, Any], gpus: int) -> None:
    check_parameters(gpus=gpus, **values)


# ------------------------------------------------------------------------------------------ submit
def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


def _api_error(e: Exception, host: str, token: str | None) -> UserError:
    status = getattr(e, "status", None)
    message = getattr(e, "reason", None) or type(e).__name__
    body = getattr(e, "body", None)
    if body:
        try:
            message = json.loads(body).get("message") or message
        except (ValueError, AttributeError):
            message = str(body).strip().splitlines()[0][:300]
    where = f"HTTP {status}" if status else "request failed"
    return UserError(_scrub(f"{host}: KFP API {where}: {message}", token))


def _run_url(host: str, run_id: str) -> str:
    return redact(f"{(os.environ.get(UI_HOST_ENV) or host).rstrip('/')}/#/runs/details/{run_id}")


def connect(request: SubmitRequest) -> tuple[str | None, dict[str, Any]]:
    """The token and the host's healthz answer; UserError (one line) for anything that would fail later."""
    token = read_token(request.token, request.token_file)
    warning = check_token_transport(request.host, token, request.insecure)
    if warning:
        print(warning, file=sys.stderr)
    health = check_host(request.host, token, request.connect_timeout)
    if health.get("multi_user") is True and not request.namespace:
        raise UserError(
            f"{request.host}: multi-user Kubeflow Pipelines: pass --namespace (your profile namespace) "
            "or set `namespace:` in the params file"
        )
    return token, health


def checked_image(image: str | None) -> str:
    image = effective_image(image)
    split_image(image)
    if not is_pinned(image):
        print(
            f"warning: image {image} is not pinned by a tag or digest: the run may not use the tested code",
            file=sys.stderr,
        )
    return image


@dataclass
class Target:
    """What a run or schedule starts: a package compiled now, or a stored pipeline version (its spec
    written to `package` so both are checked alike)."""

    package: Path
    image: str
    pipeline_id: str | None = None
    version_id: str | None = None


def prepare_target(request: SubmitRequest, token, health, folder: Path) -> Target:
    """Compile for the image, or fetch the stored version; then the backend check."""
    package = folder / "pipeline.yaml"
    if request.pipeline_version:
        client = kfp_client(request, token)
        pipeline_id, version = find_version(client, request, token)
        write_stored_spec(version.pipeline_spec, package)
        target = Target(package, image=package_image(package), pipeline_id=pipeline_id,
                        version_id=version.pipeline_version_id)  # fmt: skip
    else:
        image = checked_image(request.image)
        compile_package(package, request.image, request.cluster)
        target = Target(package, image=image)
    warning = check_backend(request.host, health, package)
    if warning:
        print(warning, file=sys.stderr)
    return target


def checked_values(request: SubmitRequest, package: Path, log, pin_rev: bool = True) -> dict[str, Any]:
    """The run's parameters: merged, typed by the spec, the dvc rev pinned to a SHA, checked."""
    values = merge_parameters(root_parameters(package), request)
    if pin_rev:
        note = resolve_dataset_rev(values)
        if note:
            log(note)
    gpus = request.cluster.get("gpus")
    check_values(values, DEFAULT_GPUS if gpus is None else int(gpus))
    if int(request.cluster.get("nodes") or 1) > 1 and not values.get("checkpoint_root"):
        raise UserError("--nodes > 1 needs --checkpoint-root: the PyTorchJob's nodes resume from it, and the "
                        "model is handed on from it")  # fmt: skip
    return values


def submit(request: SubmitRequest, log=print) -> SubmitResult:
    """Check the host, compile for the image (or fetch the stored version), check the parameters, run."""
    token, health = connect(request)
    with tempfile.TemporaryDirectory(prefix="yolo-submit-") as tmp:
        target = prepare_target(request, token, health, Path(tmp))
        values = checked_values(request, target.package, log)
        experiment = request.experiment or DEFAULT_EXPERIMENT
        run_name = request.run_name or f"yolo-training {target.image.rsplit('/', 1)[-1]}"
        run_id, state = _create_run(request, token, target, values, experiment, run_name)
    url = _run_url(request.host, run_id)
    return SubmitResult(
        run_id=run_id, url=url, experiment=experiment, image=target.image, parameters=values, state=state
    )


def _create_run(request: SubmitRequest, token, target: Target, values, experiment: str, run_name: str):
    errors = api_errors()
    service_account = request.cluster.get("service_account") or None
    with quiet_kfp():
        try:
            client = kfp_client(request, token)
            if target.version_id:
                experiment_id = client.create_experiment(experiment, namespace=request.namespace).experiment_id
                result = client.run_pipeline(
                    experiment_id, run_name, params=values, pipeline_id=target.pipeline_id,
                    version_id=target.version_id, service_account=service_account,
                )  # fmt: skip
            else:
                result = client.create_run_from_pipeline_package(
                    str(target.package),
                    arguments=values,
                    run_name=run_name,
                    experiment_name=experiment,
                    namespace=request.namespace,
                    service_account=service_account,
                )
        except errors as e:
            raise _api_error(e, request.host, token) from None
        run_id = result.run_id
        if not run_id:
            raise UserError(f"{request.host}: KFP API created a run but returned no run_id")
        if not request.wait:
            return run_id, None
        try:
            run = client.wait_for_run_completion(
                run_id, timeout=request.wait_timeout, sleep_duration=request.poll_interval
            )
        except TimeoutError:
            raise UserError(f"run {run_id}: not finished after {request.wait_timeout:g} s") from None
        except errors as e:
            raise _api_error(e, request.host, token) from None
        return run_id, str(run.state or "UNKNOWN").upper()


# --------------------------------------------------------------------------- stored pipeline versions
def _name_filter(name: str) -> str:
    return json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]})


def find_pipeline(client, request: SubmitRequest) -> str | None:
    """The id of the pipeline named request.pipeline in the namespace, or None."""
    found = client.list_pipelines(filter=_name_filter(request.pipeline), namespace=request.namespace).pipelines
    if found and len(found) > 1:
        raise UserError(f"{request.host}: {len(found)} pipelines are named {request.pipeline!r}")
    return found[0].pipeline_id if found else None


def find_version(client, request: SubmitRequest, token):
    """(pipeline id, the stored version) of --pipeline / --pipeline-version; UserError if either is missing."""
    try:
        pipeline_id = find_pipeline(client, request)
        if pipeline_id is None:
            raise UserError(f"{request.host}: no pipeline named {request.pipeline!r} "
                            "(upload it: python -m pipelines upload --name NAME --version VERSION)")  # fmt: skip
        versions = client.list_pipeline_versions(pipeline_id, filter=_name_filter(request.pipeline_version))
    except api_errors() as e:
        raise _api_error(e, request.host, token) from None
    found = versions.pipeline_versions or []
    if not found:
        raise UserError(f"{request.host}: pipeline {request.pipeline!r} has no version {request.pipeline_version!r}")
    return pipeline_id, found[0]


def write_stored_spec(spec: Any, package: Path) -> None:
    """A stored version's spec as a package file: the PipelineSpec, and the PlatformSpec when it has one
    (the API returns {pipeline_spec, platform_spec} for a package of two documents)."""
    if not isinstance(spec, dict):
        raise UserError("the stored pipeline version has no pipeline spec")
    docs = [spec["pipeline_spec"], spec.get("platform_spec") or {}] if "pipeline_spec" in spec else [spec]
    package.write_text(yaml.safe_dump_all(docs, sort_keys=False))


def package_image(package: Path) -> str:
    with package.open() as f:
        pipeline = next(yaml.safe_load_all(f))
    images = sorted({e.get("container", {}).get("image", "") for e in pipeline["deploymentSpec"]["executors"].values()})
    return ", ".join(filter(None, images)) or "?"


# --------------------------------------------------------------------------------------------- CLI
def _name_value(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name.strip().replace("-", "_"), value


def add_connection_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--host", required=True, help="KFP API root, e.g. http://localhost:8888 or https://KF/pipeline"
    )
    p.add_argument(
        "--token",
        help=f"bearer token; prefer ${TOKEN_ENV} or --token-file (a command line is visible to every process)",
    )
    p.add_argument(
        "--token-file",
        help=f"file holding the bearer token, read again before every request (default: ${TOKEN_PATH_ENV})",
    )
    p.add_argument(
        "--namespace", help="profile namespace (multi-user Kubeflow; default: the params file's `namespace`)"
    )
    p.add_argument(
        "--experiment", help=f"experiment name (default {DEFAULT_EXPERIMENT}, or the params file's)"
    )
    p.add_argument("--image", help="image of every step, pinned: REGISTRY/NAME:TAG or @sha256:DIGEST")
    p.add_argument("--run-name", help="display name of the run")
    p.add_argument(
        "--insecure",
        action="store_true",
        help="allow sending the token over plain http:// to a host other than localhost",
    )
    p.add_argument("--connect-timeout", type=float, default=5.0, help="seconds for the healthz check (5)")
    p.add_argument(
        "--wait", action="store_true", help="wait for the run to finish; exit 0 only if it succeeded"
    )
    p.add_argument("--wait-timeout", type=float, default=3 * 24 * 3600.0, help="seconds (3 days)")
    p.add_argument("--poll-interval", type=float, default=30.0, help="seconds between status polls (30)")


def add_pipeline_arguments(p: argparse.ArgumentParser) -> None:
    """The cluster options `compile` takes and the pipeline's parameters, all defaulting to 'not given'."""
    g = p.add_argument_group("cluster (compile-time) options")
    g.add_argument("--gpus", type=int, help="GPUs per train pod: 0, 1, 2, 4 or 8 (default 1)")
    g.add_argument("--s3-secret", help="Kubernetes Secret with AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")
    g.add_argument("--s3-endpoint", help="AWS_ENDPOINT_URL for MinIO or another S3-compatible store")
    g.add_argument("--node-selector", action="append", metavar="KEY=VALUE", help="train pods; repeatable")
    g.add_argument("--toleration", action="append", metavar="KEY[=VALUE][:EFFECT]", help="repeatable")
    g.add_argument("--train-retries", type=int)
    g.add_argument("--train-cpu")
    g.add_argument("--train-memory")
    g.add_argument("--train-cpu-limit")
    g.add_argument("--train-memory-limit")
    g.add_argument("--shm-size")
    g.add_argument("--dataset-pvc", metavar="NAME[:SUBPATH]", help="PVC with datasets (see compile --help)")
    g.add_argument("--image-pull-secret", action="append", metavar="NAME", help="registry Secret; repeatable")
    g.add_argument("--nodes", type=int, help="train nodes (> 1: a PyTorchJob launched by the train task)")
    g.add_argument("--resources", action="append", metavar="TASK:KIND=REQUEST[/LIMIT],...",
                   help="one task's requests/limits (see compile --help); repeatable")  # fmt: skip
    g.add_argument(
        "--service-account",
        help="service account the run's pods (and a PyTorchJob's) run as: IRSA / workload identity for S3",
    )
    r = p.add_argument_group("pipeline parameters")
    for parameter in PARAMETERS:
        r.add_argument(
            parameter.flag,
            dest=parameter.name,
            type=parameter.type,
            metavar=parameter.type.__name__.upper(),
            help=f"{parameter.help} (pipeline default: {parameter.default!r})",
        )
    r.add_argument(
        "--param",
        action="append",
        type=_name_value,
        default=[],
        metavar="NAME=VALUE",
        help="any pipeline parameter, typed as the pipeline declares it; repeatable",
    )
    r.add_argument(
        "--params-file", type=Path, help="YAML with experiment/cluster/parameters (see production.yaml)"
    )
    v = p.add_argument_group("stored pipeline (instead of compiling one now)")
    v.add_argument("--pipeline", default=PIPELINE_NAME, help=f"uploaded pipeline's name (default {PIPELINE_NAME})")
    v.add_argument("--pipeline-version", help="run this uploaded version of --pipeline (see `upload`)")


def request_from_args(args: argparse.Namespace, params_file: ParamsFile | None = None) -> SubmitRequest:
    """Params file values, overridden by the flags given."""
    params_file = params_file or (load_params_file(args.params_file) if args.params_file else ParamsFile())
    cluster = dict(params_file.cluster)
    flag_cluster = {
        "gpus": args.gpus,
        "s3_secret": args.s3_secret,
        "s3_endpoint": args.s3_endpoint,
        "node_selector": args.node_selector,
        "tolerations": args.toleration,
        "train_retries": args.train_retries,
        "train_cpu": args.train_cpu,
        "train_memory": args.train_memory,
        "train_cpu_limit": args.train_cpu_limit,
        "train_memory_limit": args.train_memory_limit,
        "shm_size": args.shm_size,
        "dataset_pvc": args.dataset_pvc,
        "image_pull_secrets": args.image_pull_secret,
        "nodes": args.nodes,
        "service_account": args.service_account,
        "resources": args.resources,
    }
    cluster.update({k: v for k, v in flag_cluster.items() if v is not None})
    parameters = dict(params_file.parameters)
    parameters.update({n: getattr(args, n) for n, _ in PIPELINE_FLAGS if getattr(args, n) is not None})
    namespace = args.namespace or params_file.namespace
    check_filled(params_file, {"namespace": namespace, **cluster, **parameters})
    return SubmitRequest(
        host=args.host,
        token=args.token,
        token_file=args.token_file,
        pipeline=args.pipeline,
        pipeline_version=args.pipeline_version,
        image=args.image,
        experiment=args.experiment or params_file.experiment,
        namespace=namespace,
        run_name=args.run_name,
        cluster=cluster,
        parameters=parameters,
        raw_parameters=dict(args.param),
        wait=args.wait,
        insecure=args.insecure,
        wait_timeout=args.wait_timeout,
        poll_interval=args.poll_interval,
        connect_timeout=args.connect_timeout,
    )


def report(result: SubmitResult) -> int:
    print(f"run_id: {result.run_id}")
    print(f"url: {result.url}")
    if result.state is None:
        return 0
    print(f"state: {result.state}")
    return 0 if result.state == "SUCCEEDED" else 1


def add_parser(sub) -> None:
    """Register `submit` on the `python -m pipelines` subparsers."""
    p = sub.add_parser("submit", help="compile for a pinned image and start a run on a KFP cluster")
    add_connection_arguments(p)
    add_pipeline_arguments(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    return report(submit(request_from_args(args), log=lambda line: print(line, file=sys.stderr)))
