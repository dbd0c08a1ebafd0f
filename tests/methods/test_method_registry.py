"""One list of methods, and method knowledge kept in the methods.

The training loop, the Ray worker and the checkpoints name no method: the order of the steps,
the optimiser settings, the default LR schedule and per-worker state are the methods' hooks.
The methods import nothing from components/training (only the leaf statistics module), so
the stages that load a trained generator do not depend on the training code.
"""

import ast
from pathlib import Path
from typing import get_args

import pytest
import torch
import yaml

from components.config.model import MethodParams, ModelParams
from components.methods.base import Method, Sampler
from components.methods.registry import METHODS, build_sampler

ROOT = Path(__file__).resolve().parents[2]
SMALL_UNET = {"width": 8, "channel_multipliers": [1, 2], "attention_levels": [], "blocks_per_level": 1, "groups": 4,
              "attention_heads": 1, "attention_head_dim": 8, "dropout": 0.0}
LOSS = {"gan_loss": "vanilla", "label_smoothing": 0.0, "lambda_l1": 100.0, "r1_gamma": 0.0, "r1_interval": 16}
SMALL = {
    "pix2pix": {"name": "pix2pix", "generator": {"ngf": 8, "max_multiplier": 8, "norm": "instance", "dropout": 0.0},
                "discriminator": {"ndf": 8, "n_layers": 2, "norm": "instance"}, "loss": LOSS, "diffusion_gan": None},
    "atme": {"name": "atme", "generator": SMALL_UNET, "discriminator": {"ndf": 8, "n_layers": 2, "norm": "instance"},
             "w": {"channels": [8, 8, 8], "groups": 4}, "loss": LOSS, "test_map_logit": 0.0, "diffusion_gan": None},
    "ddgan": {"name": "ddgan", "generator": SMALL_UNET, "discriminator": {"ndf": 8, "n_layers": 2, "norm": "none"},
              "loss": {**LOSS, "lambda_l1": 0.0}, "num_steps": 2, "beta_min": 0.1, "beta_max": 20.0, "nz": 4,
              "ema_decay": 0.999, "guidance": None},
}
METHOD_CLASS_NAMES = {cls.__name__ for cls in METHODS.values()} | {params.__name__ for params in METHODS}


def _model(name: str) -> ModelParams:
    model = yaml.safe_load((ROOT / "params/model.yaml").read_text())
    model.update(image_size=32, load_size=32, method=SMALL[name])
    return ModelParams.model_validate(model)


def _runtime_nodes(tree: ast.AST):
    """Every node except those under `if TYPE_CHECKING:` (imports for annotations only)."""
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
            continue
        yield child
        yield from _runtime_nodes(child)


def _imports(path: Path) -> set[str]:
    names = set()
    for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
    return names


def test_every_method_of_the_params_has_exactly_one_registered_class():
    branches = {get_args(branch)[0] for branch in get_args(get_args(MethodParams)[0])}
    assert set(METHODS) == branches
    assert all(issubclass(cls, Method) for cls in METHODS.values())


@pytest.mark.parametrize("name", ["pix2pix", "atme", "ddgan"])
def test_the_registry_builds_each_methods_untrained_sampler(name):
    sampler = build_sampler(_model(name))
    assert isinstance(sampler, Sampler) and sampler.nfe >= 1


def test_the_methods_import_nothing_from_the_training_package():
    for path in sorted((ROOT / "components/methods").glob("*.py")):
        training = [name for name in _imports(path) if name == "components.training" or name.startswith("components.training.")]
        assert not training, f"{path.name} imports {training}"


def test_the_loop_worker_and_checkpoints_name_no_method():
    for path in sorted((ROOT / "components/training").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        named = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
        named |= {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
        named |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for alias in node.names}
        assert not named & METHOD_CLASS_NAMES, f"{path.name} names {sorted(named & METHOD_CLASS_NAMES)}"
        specific = [name for name in _imports(path) if name.startswith(("components.methods.atme", "components.methods.ddgan",
                                                                         "components.methods.pix2pix"))]
        assert not specific, f"{path.name} imports {specific}"


def test_the_default_lr_schedule_is_the_methods():
    from components.config.train import TrainParams
    from components.training.loop import TrainingSession

    train = TrainParams.model_validate({**yaml.safe_load((ROOT / "params/train.yaml").read_text()), "epochs": 4})
    first_epoch_factor = {}
    for name in ("pix2pix", "ddgan"):
        session = TrainingSession(_model(name), train, 8, torch.device("cpu"))
        assert train.lr_schedule.kind == "auto"
        assert session.method.default_lr_schedule == {"pix2pix": "linear_decay", "ddgan": "cosine"}[name]
        first_epoch_factor[name] = session.schedulers["G"].lr_lambdas[0](1)
    assert first_epoch_factor["pix2pix"] == 1.0  # linear decay: constant over the first half
    assert first_epoch_factor["ddgan"] < 0.9  # cosine: decays from the first epoch on
