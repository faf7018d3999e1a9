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
    cfg: str,
    weights: str,
    epochs: int,
    imgsz: int,
    batch_size: int,
    workers: int,
    checkpoint_root: str,
    registry_uri: str,
    min_map50: float,
    max_bad_fraction: float,
    model_name: str,
    train_extra_args: str,
    gpus: int,
) -> str:
    """Check the run's parameters, then return the source's version (commit SHA / content hash).

    Takes every pipeline parameter (source and rev are dataset_source and dataset_rev) and the train pod's
    gpus; tests/test_params_schema.py checks this list against components.params.PARAMETERS.
    """
    others = dict(locals())  # first statement: exactly the parameters above
    del others["source"], others["rev"]
    from components.datasets import resolve_version
    from components.params import check_parameters

    check_parameters(dataset_source=source, dataset_rev=rev, **others)
    return resolve_version(source, rev)


@dsl.component(base_image=pipeline_image(), install_kfp_package=False)
def import_data(source: str, version: str, dataset: Output[Dataset]):
    """Copy/download/generate the dataset into the artifact; metadata records source and version."""
    from components.datasets import import_data as materialise

    materialise(source, version, dataset)
