"""The params schema: one pydantic model per stage's YAML file, all loaded through `load_params`.

- `components.config.data`: params/data.yaml (prepare stage, the loaders, and the one image size)
- `components.config.model`: params/model.yaml (networks and method; `load_model_params` adds the data's sizes)
- `components.config.train`: params/train.yaml (loop, optimiser, health, cluster, tracking)
- `components.config.evaluate`: params/evaluate.yaml
- `components.config.register`: params/register.yaml

The YAML files are the only place values live: the models declare types and constraints,
no defaults, so every key must be given.
"""

from components.config.loading import (
    ParamsError,
    StrictModel,
    load_params,
    parse_yaml_mapping,
    read_params_text,
    read_yaml_mapping,
    validate_params,
    with_overrides,
)

__all__ = ["ParamsError", "StrictModel", "load_params", "parse_yaml_mapping", "read_params_text",
           "read_yaml_mapping", "validate_params", "with_overrides"]
