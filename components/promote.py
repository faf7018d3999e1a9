"""promote: publish best.pt + model card to models/<name>/<version>/ and update current.json."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Model

from components import pipeline_image


@dsl.component(base_image=pipeline_image(), install_kfp_package=False)
def promote(
    model: Input[Model],
    evaluation: Input[Artifact],
    registry_uri: str,
    model_name: str,
    image: str = "",
    run_key: str = "",
) -> str:
    """Returns the new version (v1, v2, ...); the next run's evaluate compares against it."""
    from components.registry import promote as run_step

    return run_step(model, evaluation, registry_uri, model_name, image, run_key)
