"""Small prepared data sets, generator files and train reports for the evaluate/register/predict stage tests."""

import math
from pathlib import Path

import torch
import yaml

from components.methods.translator import FORMAT_VERSION, build_sampler
from components.training.report import TrainReport
from components.training.report import write_train_report as write_train_report_files
from pipelines.cli import main as pairgan
from support.params import shipped, write_shipped

PROJECT = Path(__file__).resolve().parents[2]
SIZE = 16
TEST_PAIRS = 3

TINY_DATA = {
    "source": {"kind": "builtin", "path": None, "builtin": {"photos": ["astronaut", "coffee"], "train_pairs": 2, "val_pairs": 0, "test_pairs": TEST_PAIRS}},
    "image_size": SIZE,
    "loader": {"backend": "torch", "load_scale": 1.125},
}
PIX2PIX = {"name": "pix2pix", "generator": {"ngf": 8}, "discriminator": {"n_layers": 1}}
DDGAN_GUIDED = {
    "name": "ddgan", "num_steps": 2, "nz": 4, "guidance": {"weight": 0.5}, "discriminator": {"n_layers": 1},
    "generator": {"width": 8, "channel_multipliers": [1, 2], "attention_levels": [], "blocks_per_level": 1,
                  "groups": 4, "attention_heads": 1, "attention_head_dim": 8},
}


def make_project(root: Path) -> Path:
    """A working folder as `dvc repro` sees it: params/ (the project's, with tiny data) and data/prepared."""
    params = root / "params"
    params.mkdir(parents=True)
    for name in ("evaluate.yaml", "register.yaml"):
        (params / name).write_text((PROJECT / "params" / name).read_text())
    evaluate = yaml.safe_load((params / "evaluate.yaml").read_text())
    evaluate["latency"] = {"warmup": 0, "repeats": 1}
    evaluate["guidance_sweep"] = {"weights": [0.0, 1.0]}
    (params / "evaluate.yaml").write_text(yaml.safe_dump(evaluate))
    write_shipped(params, "data", **TINY_DATA)
    assert pairgan(["prepare", "--params-dir", str(params), "--out", str(root / "data/prepared"),
                    "--report", str(root / "reports/prepare.json"), "--no-progress"]) == 0
    return root


def write_generator(
    path: Path, method: dict = PIX2PIX, seed: int = 0, image_size: int = SIZE, constant: float | None = None
) -> Path:
    """A train-stage generator file (the Translator export format), randomly initialised.

    `constant` (pix2pix only): every weight zero and the output layer's bias atanh(constant),
    so the generator draws that grey level everywhere; a predictable better or worse model.
    """
    torch.manual_seed(seed)
    model = shipped("model", image_size=image_size, method=method)
    sampler = build_sampler(model)
    if constant is not None:
        state = sampler.state_dict()
        for tensor in state.values():
            if tensor.is_floating_point():
                tensor.zero_()
        # the output layer's is the only bias with one value per target channel
        (output_bias,) = [name for name, tensor in state.items() if name.endswith(".bias") and tensor.numel() == model.target_channels]
        state[output_bias].fill_(math.atanh(constant))
    guidance = float(method.get("guidance", {}).get("weight", 0.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format_version": FORMAT_VERSION, "model": model.model_dump(mode="json"),
                "sampler_state": sampler.state_dict(), "guidance_weight": guidance,
                "metadata": {"method": method["name"]}}, path)
    return path


def write_train_report(path: Path, status: str = "finished", **extra) -> Path:
    """A train stage report (train.json and train_info.json) of a 1-epoch pix2pix run."""
    report = TrainReport.model_validate({
        "status": status, "method": "pix2pix", "steps": 2, "data_checksum": "0" * 64, "mlflow_run_id": None,
        "checkpoint": None, "metrics": {"loss/G": 2.5, "loss/D": 0.7, "epoch": 1}, **extra,
    })
    path.parent.mkdir(parents=True, exist_ok=True)
    write_train_report_files(path, report, history=[{"epoch": 1, "loss/G": 2.5, "loss/D": 0.7}])
    return path


def evaluated_project(root: Path) -> Path:
    """A project folder at `root` with a tiny prepared data set, a pix2pix generator, its train
    report and `pairgan evaluate`'s report: what `pairgan register` reads."""
    make_project(root)
    write_generator(root / "models/generator.pt")
    write_train_report(root / "reports/train.json")
    args = ["--params-dir", str(root / "params"), "--data", str(root / "data/prepared"),
            "--model", str(root / "models/generator.pt"), "--train-report", str(root / "reports/train.json")]
    assert pairgan(["evaluate", *args, "--out", str(root / "reports/evaluate")]) == 0
    return root
