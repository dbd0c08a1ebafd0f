"""The champion/challenger gate on a throwaway SQLite store, with stand-in translators."""

import math
from pathlib import Path

import mlflow
import mlflow.pytorch
import pytest
import torch
import yaml
from torch import nn

from components.config import ParamsError, load_params
from components.config.register import RegisterParams
from components.evaluation.held_out import score_held_out
from components.registry.flavor import TranslatorCard
from components.registry.gate import (
    CHALLENGER,
    ChampionUnusable,
    RegistrationRefused,
    current_champion_version,
    refuse_unless_healthy,
    register_with_gate,
)
from components.registry.loading import load_registered
from components.registry.model_card import Provenance
from support.scaled_translators import Scale

CPU = torch.device("cpu")
SIZE = 16
IMAGES = 16
PROJECT = Path(__file__).resolve().parents[2]
PROVENANCE = Provenance("pix2pix", {"method.name": "pix2pix", "image_size": SIZE}, "abc123", "f" * 64, None)


@pytest.fixture(autouse=True)
def _isolated_mlflow(monkeypatch, tmp_path):
    # a SQLite store keeps its artifacts in ./mlruns of the working directory: keep them in tmp
    monkeypatch.chdir(tmp_path)


def register_params(**overrides) -> RegisterParams:
    shipped = yaml.safe_load((PROJECT / "params/register.yaml").read_text())
    return RegisterParams.model_validate({**shipped, "model_name": "facades", **overrides})


class Noisy(nn.Module):
    """The exact target plus a fixed noise pattern whose amplitude depends on the image:
    `bright` on images with a positive mean, `dark` on the others. Per-image PSNR is then a
    function of the amplitude alone, so each model's score on each image is known."""

    def __init__(self, bright: float, dark: float):
        super().__init__()
        self.register_buffer("pattern", torch.sign(torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7))))
        self.register_buffer("amplitudes", torch.tensor([dark, bright]))

    def forward(self, source):
        amplitude = self.amplitudes[(source.mean(dim=(1, 2, 3)) > 0).long()]
        return source * 0.5 + amplitude[:, None, None, None] * self.pattern


def held_out_batches(size: int = SIZE):
    # half the images brighter than 0 on average, half darker, all in [-0.5, 0.5] so nothing clamps
    generator = torch.Generator().manual_seed(0)
    source = torch.rand(IMAGES, 3, size, size, generator=generator) - 0.5
    source += torch.where(torch.arange(IMAGES) % 2 == 0, 0.1, -0.1)[:, None, None, None]
    return [{"source": source, "target": source * 0.5, "index": torch.arange(IMAGES),
             "flip": torch.zeros(IMAGES, dtype=torch.bool), "crop": torch.zeros(IMAGES, 2, dtype=torch.int64)}]


def score(module):
    return score_held_out(module, held_out_batches(), CPU)


CARD = TranslatorCard(nfe=1, supports_guidance=False, guidance_weight=None, channels=3, image_size=SIZE)


@pytest.fixture
def store(mlflow_store):
    """Each registry test starts from a new, empty store."""
    return mlflow_store


def register(store, translator, params=None, card=CARD, scorer=score, **options):
    return register_with_gate(store, params or register_params(), translator, card, scorer, CPU, PROVENANCE, **options)


def champion_version(store, name="facades"):
    return current_champion_version(mlflow.MlflowClient(tracking_uri=store), name)


def test_first_model_becomes_champion_and_loads_back_from_the_registry(store):
    outcome = register(store, Scale(0.4))
    assert outcome.gate.decision == "first_champion" and outcome.promoted
    assert outcome.gate.champion_score is None and outcome.gate.comparison is None
    assert champion_version(store) == outcome.version == "1"
    client = mlflow.MlflowClient(tracking_uri=store)
    version = client.get_model_version_by_alias("facades", CHALLENGER)
    assert str(version.version) == "1"
    assert float(version.tags["metric.psnr"]) == pytest.approx(outcome.verified["psnr"], rel=1e-5)
    assert version.tags["pairgan.data_manifest_checksum"] == "abc123"
    assert version.tags["gate.decision"] == "first_champion"
    assert "first registered model" in version.tags["gate.reason"]
    # the training run (here: the run register created) names the version it became
    assert client.get_run(outcome.run_id).data.tags["pairgan.registered_version"] == "1"
    # what mlflow.pytorch users get: the registered model loads and runs at any batch size
    mlflow.set_tracking_uri(store)
    loaded = mlflow.pytorch.load_model("models:/facades@champion")
    source = torch.rand(3, 3, SIZE, SIZE)
    assert torch.allclose(loaded(source), Scale(0.4)(source))
    report = outcome.report()
    assert report["promoted"] is True and report["version"] == 1 and report["champion_version"] == 1


def test_version_description_is_a_model_card(store):
    outcome = register(store, Scale(0.4))
    description = mlflow.MlflowClient(tracking_uri=store).get_model_version("facades", outcome.version).description
    for expected in ("pix2pix", "abc123", "f" * 64, outcome.run_id, f"psnr {outcome.verified['psnr']:.4g}",
                     "pairgan predict --model models:/facades/1", 'mlflow.pyfunc.load_model("models:/facades/1")',
                     "mlflow models serve -m models:/facades@champion", "| `image_size` | `16` |"):
        assert expected in description


def test_registered_graph_runs_on_another_device_despite_devices_recorded_in_it(store):
    class MakesATensor(Scale):
        def forward(self, source):
            # recorded as device='cpu' in the exported graph, as DDGAN's time steps are
            steps = torch.full((source.shape[0],), 2.0, device=source.device)
            return source * self.factor * steps[:, None, None, None]

    outcome = register(store, MakesATensor(0.25))
    # "meta" stands in for "cuda" on a machine without a GPU: a device mismatch fails the same way
    loaded = load_registered(outcome.model_uri, store, torch.device("meta"))
    assert loaded.module(torch.zeros(3, 3, SIZE, SIZE, device="meta")).device.type == "meta"


def test_clearly_better_challenger_is_promoted_and_worse_one_leaves_champion_untouched(store):
    register(store, Noisy(0.2, 0.2))
    better = register(store, Noisy(0.1, 0.1))
    assert better.gate.decision == "promoted" and better.gate.champion_version_before == "1"
    comparison = better.gate.comparison
    assert comparison.samples == IMAGES and comparison.resamples == 2000 and comparison.confidence == 0.95
    assert 0 < comparison.interval_low <= comparison.mean_improvement <= comparison.interval_high
    assert champion_version(store) == "2"

    worse = register(store, Noisy(0.3, 0.3))
    assert worse.gate.decision == "kept_champion" and not worse.promoted
    assert champion_version(store) == "2" and worse.champion_version_after == "2"
    client = mlflow.MlflowClient(tracking_uri=store)
    assert str(client.get_model_version_by_alias("facades", CHALLENGER).version) == "3"
    tags = client.get_model_version("facades", "3").tags
    assert tags["gate.decision"] == "kept_champion" and tags["gate.champion_version_before"] == "2"
    assert float(tags["gate.champion_score"]) == pytest.approx(better.gate.challenger_score, rel=1e-5)
    assert float(tags["gate.interval_high"]) < 0 and tags["gate.confidence"] == "0.95"


def test_challenger_better_only_by_noise_keeps_the_champion(store):
    register(store, Noisy(bright=0.1, dark=0.3))
    # worse on every bright image, better on every dark one: a higher mean PSNR that another
    # draw of held-out images would reverse
    noise = register(store, Noisy(bright=0.3, dark=0.099))
    assert noise.gate.challenger_score > noise.gate.champion_score
    comparison = noise.gate.comparison
    assert comparison.interval_low < 0 < comparison.mean_improvement < comparison.interval_high
    assert noise.gate.decision == "kept_champion" and champion_version(store) == "1"
    assert "not entirely above the margin" in noise.gate.reason
    report = noise.report()
    assert report["interval_low"] == comparison.interval_low and report["interval_high"] == comparison.interval_high


def test_the_margin_applies_to_the_lower_end_of_the_interval(store):
    register(store, Noisy(0.2, 0.2))
    # about 3.5 dB better on every image: significant, but not by the 5 dB margin
    almost = register(store, Noisy(0.135, 0.135), params=register_params(margin=5.0))
    assert almost.gate.comparison.interval_low > 0
    assert almost.gate.decision == "kept_champion" and champion_version(store) == "1"


def test_the_same_scores_give_the_same_interval(store):
    register(store, Noisy(0.1, 0.3))
    first = register(store, Noisy(0.3, 0.099)).gate.comparison
    second = register(store, Noisy(0.3, 0.099)).gate.comparison
    assert (first.interval_low, first.interval_high) == (second.interval_low, second.interval_high)


def test_champion_that_cannot_take_the_new_image_size_is_replaced_and_the_rule_recorded(store):
    register(store, Scale(0.5))  # a 16 px champion, as before image_size changed

    def score_at_24(module):
        return score_held_out(module, held_out_batches(24), CPU)

    card = TranslatorCard(nfe=1, supports_guidance=False, guidance_weight=None, channels=3, image_size=24)
    outcome = register(store, Scale(0.3), card=card, scorer=score_at_24)
    assert outcome.gate.decision == "replaced_incompatible_champion" and outcome.promoted
    assert champion_version(store) == "2" and outcome.gate.champion_version_before == "1"
    assert "3 x 16 x 16" in outcome.gate.reason and "3 x 24 x 24" in outcome.gate.reason
    tags = mlflow.MlflowClient(tracking_uri=store).get_model_version("facades", "2").tags
    assert tags["gate.decision"] == "replaced_incompatible_champion" and "cannot be scored" in tags["gate.reason"]


def test_champion_that_fails_on_data_it_accepts_stops_the_gate_and_registers_nothing(store):
    register(store, Scale(0.3))

    def failing_for_champion(module, calls=[]):
        calls.append(module)
        if len(calls) == 2:  # the challenger is scored first, then the champion
            raise RuntimeError("CUDA error: an illegal memory access")
        return score(module)

    with pytest.raises(ChampionUnusable, match="version 1.*illegal memory access.*nothing was registered"):
        register(store, Scale(0.4), scorer=failing_for_champion)
    assert champion_version(store) == "1"
    assert len(mlflow.MlflowClient(tracking_uri=store).search_model_versions("name='facades'")) == 1


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
    client = mlflow.MlflowClient(tracking_uri=store)
    assert client.search_model_versions("name='facades'") == []
    (run,) = client.search_runs([client.get_experiment_by_name("pairgan").experiment_id])
    assert run.info.status == "FAILED"


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
    ("text", "key", "reason"),
    [
        ("primary_metric: accuracy\n", "primary_metric", "Input should be"),
        ("primary_metric: fid\n", "primary_metric", "set-level metric"),
        ("margin: -1\n", "margin", "greater than or equal"),
        ("model_name: 'a b'\n", "model_name", "letters, digits"),
        ("model_name: pairgan-generator.lock\n", "model_name", "registry lock"),
        ("confidence: 1.0\n", "confidence", "less than 1"),
        ("confidence: 0.3\n", "confidence", "greater than 0.5"),
        ("bootstrap_resamples: 10\n", "bootstrap_resamples", "greater than or equal to 100"),
        ("lock_timeout_s: -5\n", "lock_timeout_s", "greater than or equal to 0"),
    ],
)
def test_bad_register_params_name_file_key_and_reason(tmp_path, text, key, reason):
    path = tmp_path / "register.yaml"
    path.write_text(text)
    with pytest.raises(ParamsError) as caught:
        load_params(path, RegisterParams)
    assert f"{path}: {key}:" in str(caught.value) and reason in str(caught.value)


def test_shipped_register_params_validate_and_state_every_key():
    shipped = yaml.safe_load((PROJECT / "params/register.yaml").read_text())
    assert set(shipped) == set(RegisterParams.model_fields)
    RegisterParams.model_validate(shipped)
