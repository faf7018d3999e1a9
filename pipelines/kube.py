"""The Kubernetes API from inside a pipeline pod: the `kubernetes` client's CustomObjectsApi.

In a pod (`$KUBERNETES_SERVICE_HOST` set) the pod's service account (in-cluster config) comes first: the
PyTorchJob launcher runs there. Elsewhere, the kubeconfig ($KUBECONFIG or ~/.kube/config).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from yolo.errors import UserError

POD_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def custom_objects_api(namespace: str = "") -> tuple[Any, str]:
    """(CustomObjectsApi, namespace): `namespace`, else the pod's, else the kubeconfig context's, else default."""
    try:
        from kubernetes import client, config
    except ImportError:
        raise UserError("the kubernetes client is not installed: pip install -e '.[pipeline]'") from None
    configuration = client.Configuration()  # our own, not the client's process-wide default
    found = None
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        try:
            config.load_incluster_config(client_configuration=configuration)
            found = POD_NAMESPACE_FILE.read_text().strip() if POD_NAMESPACE_FILE.is_file() else None
        except config.ConfigException:
            configuration = client.Configuration()
    if found is None:
        path = os.environ.get("KUBECONFIG") or None  # read now: the client reads it once, when imported
        try:
            config.load_kube_config(config_file=path, client_configuration=configuration)
            _, active = config.list_kube_config_contexts(config_file=path)
            found = (active or {}).get("context", {}).get("namespace") or ""
        except (config.ConfigException, OSError) as e:
            raise UserError(f"no Kubernetes configuration (in-cluster or kubeconfig): {e}") from None
    return client.CustomObjectsApi(client.ApiClient(configuration)), namespace or found or "default"


def api_error_text(e: Any) -> str:
    """`HTTP 403 <the API server's message>` of a kubernetes ApiException."""
    try:
        message = json.loads(e.body).get("message") or e.reason
    except (TypeError, ValueError, AttributeError):
        message = getattr(e, "reason", None) or str(e)
    return f"HTTP {getattr(e, 'status', '?')} {message}"
