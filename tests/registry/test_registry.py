"""The MLflow registry and the champion/challenger gate, on a throwaway SQLite store."""

import math

import mlflow
import mlflow.pytorch
import pytest
import torch
from torch import nn

from components.config import ParamsError, load_params
from components.config.register import RegisterParams
from components.evaluation.held_out import score_held_out
from components.registry import (
    CHALLENGER,
    ChampionUnscoreable,
    RegistrationRefused,
    TranslatorCard,
    current_champion_version,
    decide,
    load_registered,
    refuse_unless_healthy,
    register_with_gate,
)
from support.params import shipped

CPU = torch.device("cpu")
SIZE = 16


@pytest.fixture(autouse=True)
def _isolated_mlflow(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    # a SQLite store keeps its artifacts in ./mlruns of the working directory: keep them in tmp
    monkeypatch.chdir(tmp_path)


class Scale(nn.Module):
    """Stand-in translator: output = source * factor. The held-out targets are source * 0.5."""

    supports_guidance = False

    def __init__(self, factor: float):
        super().__init__()
        self.factor = nn.Parameter(torch.tensor(factor))
        self.nfe = 1

    def forward(self, source):
        return (source * self.factor).clamp(-1, 1)


def held_out_batches():
    generator = torch.Generator().manual_seed(0)
    source = torch.rand(4, 3, SIZE, SIZE, generator=generator) * 2 - 1
    return [{"source": source, "target": source * 0.5, "index": torch.arange(4),
             "flip": torch.zeros(4, dtype=torch.bool), "crop": torch.zeros(4, 2, dtype=torch.int64)}]


def psnr_score(module):
    return score_held_out(module, held_out_batches(), CPU).means["psnr"]


CARD = TranslatorCard(nfe=1, supports_guidance=False, guidance_weight=None, channels=3, image_size=SIZE)


@pytest.fixture
def store(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def register(store, translator, params=shipped("register", model_name="facades"), **options):
    return register_with_gate(store, params, translator, CARD, psnr_score, CPU, **options)


def champion_version(store, name="facades"):
    return current_champion_version(store, name)


def test_first_model_becomes_champion_and_loads_back_from_the_registry(store):
    outcome = register(store, Scale(0.4), metrics={"psnr": 30.0}, tags={"pairgan.data_manifest_checksum": "abc123"})
    assert outcome.gate.decision == "first_champion" and outcome.gate.promoted
    assert outcome.gate.champion_score is None
    assert champion_version(store) == outcome.version == "1"
    client = mlflow.MlflowClient(tracking_uri=store)
    version = client.get_model_version_by_alias("facades", CHALLENGER)
    assert str(version.version) == "1"
    assert version.tags["metric.psnr"] == "30"
    assert version.tags["pairgan.data_manifest_checksum"] == "abc123"
    assert version.tags["gate.decision"] == "first_champion"
    # what predict and the next gate use: the registered model loads and runs at any batch size
    mlflow.set_tracking_uri(store)
    loaded = mlflow.pytorch.load_model("models:/facades@champion")
    source = torch.rand(3, 3, SIZE, SIZE)
    assert torch.allclose(loaded(source), Scale(0.4)(source))
    assert outcome.report()["promoted"] is True and outcome.report()["version"] == 1


def test_registered_graph_runs_on_another_device_despite_devices_recorded_in_it(store):
    class MakesATensor(Scale):
        def forward(self, source):
            # recorded as device='cpu' in the exported graph, as DDGAN's time steps are
            steps = torch.full((source.shape[0],), 2.0, device=source.device)
            return source * self.factor * steps[:, None, None, None]

    outcome = register(store, MakesATensor(0.25))
    # "meta" stands in for "cuda" on a machine without a GPU: a device mismatch fails the same way
    loaded = load_registered(outcome.model_uri, store, torch.device("meta"))
    assert loaded(torch.zeros(3, 3, SIZE, SIZE, device="meta")).device.type == "meta"


def test_better_challenger_is_promoted_and_worse_one_leaves_champion_untouched(store):
    register(store, Scale(0.3))
    better = register(store, Scale(0.45))
    assert better.gate.decision == "promoted" and better.gate.champion_version_before == "1"
    assert better.gate.challenger_score > better.gate.champion_score
    assert champion_version(store) == "2"

    worse = register(store, Scale(0.2))
    assert worse.gate.decision == "kept_champion" and not worse.gate.promoted
    assert champion_version(store) == "2"
    assert worse.champion_version_after == "2"
    client = mlflow.MlflowClient(tracking_uri=store)
    assert str(client.get_model_version_by_alias("facades", CHALLENGER).version) == "3"
    tags = client.get_model_version("facades", "3").tags
    assert tags["gate.decision"] == "kept_champion" and tags["gate.champion_version_before"] == "2"
    assert float(tags["gate.champion_score"]) == pytest.approx(better.gate.challenger_score, rel=1e-5)
    assert float(tags["gate.challenger_score"]) < float(tags["gate.champion_score"])


def test_improvement_within_the_margin_is_not_enough(store):
    register(store, Scale(0.3))
    almost = register(store, Scale(0.31), params=shipped("register", model_name="facades", margin=5.0))
    assert almost.gate.decision == "kept_champion" and champion_version(store) == "1"


def test_nan_model_is_never_registered(store):
    class Nan(Scale):
        def forward(self, source):
            return source * self.factor * float("nan")

    with pytest.raises(RegistrationRefused, match="not registered"):
        register(store, Nan(0.5))
    assert mlflow.MlflowClient(tracking_uri=store).search_model_versions("name='facades'") == []


def test_model_that_torch_export_cannot_capture_is_refused_with_the_reason(store):
    class DataDependent(Scale):
        def forward(self, source):
            if source.mean() > 0:  # Python control flow on a tensor value: not exportable
                return source * self.factor
            return source

    with pytest.raises(RegistrationRefused, match="pt2"):
        register(store, DataDependent(0.5))
    assert mlflow.MlflowClient(tracking_uri=store).search_model_versions("name='facades'") == []
    client = mlflow.MlflowClient(tracking_uri=store)
    (run,) = client.search_runs([client.get_experiment_by_name("pairgan").experiment_id])
    assert run.info.status == "FAILED"


def test_champion_that_cannot_run_on_the_data_stops_the_gate(store):
    register(store, Scale(0.3))

    def failing_for_champion(module, calls=[]):
        calls.append(module)
        if len(calls) == 2:  # the challenger is scored first, then the champion
            raise RuntimeError("shape mismatch")
        return psnr_score(module)

    with pytest.raises(ChampionUnscoreable, match="version 1"):
        register_with_gate(store, shipped("register", model_name="facades"), Scale(0.4), CARD, failing_for_champion, CPU)
    assert champion_version(store) == "1"


def test_diverged_or_non_finite_runs_are_refused():
    with pytest.raises(RegistrationRefused, match="diverged.*D loss collapsed"):
        refuse_unless_healthy({"status": "diverged", "divergence_reason": "D loss collapsed"}, {"psnr": 20.0})
    with pytest.raises(RegistrationRefused, match="g_loss"):
        refuse_unless_healthy({"status": "finished", "metrics": {"g_loss": math.inf}}, {"psnr": 20.0})
    with pytest.raises(RegistrationRefused, match="ssim"):
        refuse_unless_healthy({"status": "finished"}, {"psnr": 20.0, "ssim": math.nan})
    with pytest.raises(RegistrationRefused, match="l1"):
        refuse_unless_healthy({"status": "finished"}, {"psnr": 20.0, "l1": None})
    refuse_unless_healthy({"status": "finished", "metrics": {"g_loss": 2.0}}, {"psnr": 20.0})


@pytest.mark.parametrize(
    ("metric", "challenger", "champion", "promoted"),
    [("psnr", 21.0, 20.0, True), ("psnr", 20.0, 20.0, False), ("l1", 0.1, 0.2, True), ("fid", 30.0, 25.0, False)],
)
def test_gate_direction_follows_the_metric(metric, challenger, champion, promoted):
    assert decide(metric, 0.0, challenger, ("1", champion)).promoted is promoted


@pytest.mark.parametrize(
    ("text", "key"),
    [("primary_metric: accuracy\n", "primary_metric"), ("margin: -1\n", "margin"), ("model_name: 'a b'\n", "model_name")],
)
def test_bad_register_params_name_file_and_key(tmp_path, text, key):
    path = tmp_path / "register.yaml"
    path.write_text(text)
    with pytest.raises(ParamsError) as caught:
        load_params(path, RegisterParams)
    assert f"{path}: {key}:" in str(caught.value)
