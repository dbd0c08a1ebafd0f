"""A small project for `pairgan tune` tests: the shipped params with a tiny model, prepared built-in data."""

from pathlib import Path

import yaml
from mlflow import MlflowClient

from components.config import with_overrides
from components.tuning.tracking import TAG_PARENT, TAG_SWEEP
from pipelines.cli import main as pairgan
from support.params import shipped_yaml

PROJECT = Path(__file__).resolve().parents[2]


def write_project(root: Path, tune: dict, train_pairs: int = 13) -> Path:
    """params/ (the shipped files with a tiny model) and data/prepared, as `dvc repro prepare` leaves them."""
    params = root / "params"
    params.mkdir(parents=True)
    data = shipped_yaml("data", source={"kind": "builtin", "path": None,
                                        "builtin": {"train_pairs": train_pairs, "val_pairs": 2, "test_pairs": 1}},
                        image_size=32, loader={"backend": "torch", "load_scale": 1.125, "num_threads": 1})
    model = shipped_yaml("model", method={"generator": {"ngf": 8, "max_multiplier": 2},
                                          "discriminator": {"ndf": 8, "n_layers": 2}})
    train = shipped_yaml("train", batch_size=2, validation={"samples": 2}, run={"tracking": {"system_metrics": False}})
    sweep = with_overrides(shipped_yaml("tune", trial={"epochs": 2, "use_gpu": False},
                                        run={"storage_path": str(root / "sweeps")}), tune)
    sweep["fixed"] = {**shipped_yaml("tune")["fixed"], **tune.get("fixed", {})}
    sweep["fixed"]["model.method.diffusion_gan"] = {**sweep["fixed"]["model.method.diffusion_gan"], "t_max": 50}
    sweep["space"] = tune["space"]
    for name, content in (("data", data), ("model", model), ("train", train), ("tune", sweep)):
        (params / f"{name}.yaml").write_text(yaml.safe_dump(content, sort_keys=False))
    assert pairgan(["prepare", "--params-dir", str(params), "--out", str(root / "data/prepared"),
                    "--report", str(root / "reports/prepare.json"), "--no-progress"]) == 0
    return params


def tune_args(root: Path) -> list[str]:
    return ["tune", "--params-dir", str(root / "params"), "--data", str(root / "data/prepared"),
            "--out", str(root / "reports/tune")]


def sweep_runs(tracking_uri: str) -> tuple:
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name("pairgan-tune")
    runs = client.search_runs([experiment.experiment_id])
    parents = [run for run in runs if TAG_SWEEP in run.data.tags]
    children = [run for run in runs if TAG_PARENT in run.data.tags]
    return client, parents, children


