"""The params schema: one pydantic model per stage's YAML file, all loaded through `load_params`.

- `components.config.data`: params/data.yaml (prepare stage and the loaders)
- `components.config.model`: params/model.yaml (networks and method)
- `components.config.train`: params/train.yaml (loop, optimiser, health, cluster, tracking)
- `components.config.evaluate`: params/evaluate.yaml
- `components.config.register`: params/register.yaml
"""

from components.config.loading import ParamsError, StrictModel, load_params, read_yaml_mapping, validate_params

__all__ = ["ParamsError", "StrictModel", "load_params", "read_yaml_mapping", "validate_params"]
