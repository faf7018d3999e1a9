"""import_data: resolve the dataset source to a version, then materialise it as a Dataset artifact.

Two components: `resolve_dataset_version` (never cached: it looks at the source now, checks the run's
parameters, and returns a commit SHA or content hash) and `import_data` (cached, keyed by that version,
so validate and stats are cache hits exactly when the data is unchanged — never keyed by a branch name).
"""

from kfp import dsl
from kfp.dsl import Dataset, Output

from components import pipeline_image


@dsl.component(base_image=pipeline_image(), install_kfp_package=False)
def resolve_dataset_version(
    source: str,
    rev: str,
    imgsz: int,
    epochs: int,
    batch_size: int,
    gpus: int,
    min_map50: float,
    max_bad_fraction: float,
    model_name: str,
    cfg: str,
    weights: str,
    checkpoint_root: str,
    registry_uri: str,
) -> str:
    """Check the run's parameters, then return the source's version (commit SHA / content hash)."""
    from components.params import check_parameters
    from components.runtime import resolve_version

    check_parameters(
        dataset_source=source,
        imgsz=imgsz,
        epochs=epochs,
        batch_size=batch_size,
        gpus=gpus,
        min_map50=min_map50,
        max_bad_fraction=max_bad_fraction,
        model_name=model_name,
        cfg=cfg,
        weights=weights,
        checkpoint_root=checkpoint_root,
        registry_uri=registry_uri,
    )
    return resolve_version(source, rev)


@dsl.component(base_image=pipeline_image(), install_kfp_package=False)
def import_data(source: str, version: str, dataset: Output[Dataset]):
    """Copy/download/generate the dataset into the artifact; metadata records source and version."""
    from components.runtime import import_data as materialise

    materialise(source, version, dataset)
