"""params/tune.yaml: a sweep that cannot work fails at once, naming the key, before Ray or any trial starts."""

import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from components.config import ParamsError, load_params, read_yaml_mapping
from components.config.data import READS_SHARDS_ONLY, DataParams
from components.config.tune import TuneParams
from components.training.outcome import StopRequested
from components.tuning.space import SweepSpace
from components.tuning.stopping import StopCheck, stop_requests_name
from components.tuning.sweep import concurrency, fingerprint, param_space, scheduler, search_algorithm, trial_count
from support.params import shipped as shipped_params
from support.params import shipped_yaml

PROJECT = Path(__file__).resolve().parents[2]


def shipped(name: str, **overrides) -> dict:
    return shipped_yaml(name, **overrides)


def params_folder(folder: Path, tune: dict | None = None, model: dict | None = None, train: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in (("tune", tune), ("model", model), ("train", train)):
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(content if content is not None else shipped(name), sort_keys=False))
    for name in ("data", "evaluate", "register"):
        (folder / f"{name}.yaml").write_text((PROJECT / "params" / f"{name}.yaml").read_text())
    return folder


def sweep_space(folder: Path) -> SweepSpace:
    tune = load_params(folder / "tune.yaml", TuneParams)
    data = load_params(folder / "data.yaml", DataParams, context=READS_SHARDS_ONLY)
    return SweepSpace(tune, read_yaml_mapping(folder / "model.yaml"), read_yaml_mapping(folder / "train.yaml"), data,
                      str(folder / "tune.yaml"), str(folder / "model.yaml"), str(folder / "train.yaml"),
                      str(folder / "data.yaml"))


def check(folder: Path) -> None:
    sweep_space(folder).check()


def problems_of(error: pytest.ExceptionInfo) -> dict[str, str]:
    return dict(error.value.problems)


def with_space(space: dict, **tune_overrides) -> dict:
    tune = shipped("tune", **tune_overrides)
    tune["space"] = space
    return tune


def test_the_shipped_sweep_is_valid_against_the_shipped_params(tmp_path):
    folder = params_folder(tmp_path / "params")
    space = sweep_space(folder)
    space.check()
    model, train = space.resolve(space.candidate_points()[-1])
    # The trial budget is written over params/train.yaml; the sweep trains Diffusion-GAN.
    assert train.epochs == space.tune.trial.epochs and train.run.scaling.num_workers == space.tune.trial.num_workers
    assert model.method.diffusion_gan is not None
    assert train.validation.samples > 0


@pytest.mark.parametrize(("space", "key", "reason"), [
    ({"model.method.diffusion_gan.d_taget": {"uniform": [0.45, 0.8]}},
     "space.model.method.diffusion_gan.d_taget", "unknown key"),
    # pix2pix's generator has no `width` (the DDPM U-Net's key): a key of another method
    ({"model.method.generator.width": {"choice": [32, 64]}}, "space.model.method.generator.width",
     "belongs to atme's generator"),
    ({"train.optimizer.lr_gen": {"loguniform": [1.0e-5, 1.0e-3]}}, "space.train.optimizer.lr_gen", "unknown key"),
    # an integer key drawn from a float range: random draws are not integers
    ({"model.method.diffusion_gan.t_max": {"uniform": [350.0, 500.0]}}, "space.model.method.diffusion_gan.t_max",
     "integer"),
    # some draws put t_max below t_min (set to 300 below)
    ({"model.method.diffusion_gan.t_max": {"int_range": [100, 500]}}, "space.model.method.diffusion_gan.t_max",
     "must not exceed"),
    ({"model.method.diffusion_gan.d_target": {"uniform": [0.5, 1.5]}}, "space.model.method.diffusion_gan.d_target",
     "less than 1"),
])
def test_a_space_key_that_cannot_be_trained_is_named(tmp_path, space, key, reason):
    tune = with_space(space)
    tune["fixed"]["model.method.diffusion_gan"]["t_min"] = 300
    folder = params_folder(tmp_path / "params", tune=tune)
    with pytest.raises(ParamsError) as error:
        check(folder)
    assert error.value.path == str(folder / "tune.yaml")
    problems = problems_of(error)
    assert key in problems, problems
    assert reason in problems[key]


def test_a_fixed_key_of_the_wrong_method_is_named(tmp_path):
    tune = shipped("tune")
    tune["fixed"]["model.method.num_steps"] = 4  # a DDGAN key; the shipped model is pix2pix
    folder = params_folder(tmp_path / "params", tune=tune)
    with pytest.raises(ParamsError) as error:
        check(folder)
    assert "belongs to ddgan" in problems_of(error)["fixed.model.method.num_steps"]


@pytest.mark.parametrize(("change", "key", "reason"), [
    ({"space": {"train.epochs": {"choice": [2, 4]}}}, "space", "trial.epochs"),
    ({"space": {"model.image_size": {"choice": [32, 64]}}}, "space", "params/data.yaml"),
    ({"space": {"epochs": {"choice": [2, 4]}}}, "space", "model.<key> or train.<key>"),
    ({"space": {"model.method.diffusion_gan.d_target": {"normal": [0.6, 0.1]}}}, "space.model.method.diffusion_gan.d_target",
     "exactly one of choice"),
    ({"space": {"model.method.diffusion_gan.d_target": {"uniform": [0.8, 0.45]}}},
     "space.model.method.diffusion_gan.d_target.uniform", "low < high"),
    ({"metric": "val/l1", "mode": "max"}, "mode", "use mode: min"),
    ({"search": {"algorithm": "grid"}}, "", "d_target draw from a range"),
    ({"scheduler": {"grace_period": 9}}, "", "exceeds trial.epochs"),
    ({"trial": {"gpus_per_worker": 2}}, "trial.gpus_per_worker", "a worker trains on one GPU"),
])
def test_tune_yaml_itself_is_validated(tmp_path, change, key, reason):
    tune = shipped("tune", **{k: v for k, v in change.items() if k != "space"})
    if "space" in change:
        tune["space"] = change["space"]
    folder = params_folder(tmp_path / "params", tune=tune)
    with pytest.raises(ParamsError) as error:
        load_params(folder / "tune.yaml", TuneParams)
    problems = problems_of(error)
    assert key in problems, problems
    assert reason in problems[key]


def run_tune_cli(folder: Path, cwd: Path) -> tuple[int, bool, str, float]:
    """`pairgan tune` in a fresh interpreter: (exit status, whether Ray was imported, stderr, seconds)."""
    script = (
        "import sys\nfrom pipelines.cli import main\n"
        f"status = main(['tune', '--params-dir', {str(folder)!r}, '--data', 'data/prepared', '--out', 'reports/tune'])\n"
        "print('RAY_IMPORTED' if 'ray' in sys.modules else 'NO_RAY')\nsys.exit(status)\n"
    )
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=cwd, timeout=120)
    return result.returncode, "RAY_IMPORTED" in result.stdout, result.stderr, time.monotonic() - started


def test_pairgan_tune_names_a_bad_space_key_and_exits_2_before_ray_or_anything_is_written(tmp_path):
    tune = with_space({"model.method.diffusion_gan.d_taget": {"uniform": [0.45, 0.8]}})
    tune["run"]["storage_path"] = str(tmp_path / "runs")
    folder = params_folder(tmp_path / "params", tune=tune)
    status, ray_imported, stderr, _ = run_tune_cli(folder, tmp_path)
    assert status == 2, stderr
    assert "tune.yaml: space.model.method.diffusion_gan.d_taget: unknown key" in stderr
    assert not ray_imported
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists() and not (tmp_path / "reports").exists()


def test_a_sweep_on_the_validation_score_needs_validation_on(tmp_path):
    folder = params_folder(tmp_path / "params", train=shipped("train", validation={"samples": 0}))
    status, ray_imported, stderr, _ = run_tune_cli(folder, tmp_path)
    assert status == 2, stderr
    assert "train.yaml: validation.samples: is 0" in stderr and not ray_imported


def test_optuna_missing_is_a_clear_message_naming_the_extra(tmp_path):
    pytest.importorskip("ray")
    try:
        import optuna  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("optuna is installed")
    folder = params_folder(tmp_path / "params", tune=shipped("tune", search={"algorithm": "optuna"}))
    status, ray_imported, stderr, _ = run_tune_cli(folder, tmp_path)
    assert status == 2, stderr
    assert "pip install 'pairgan[optuna]'" in stderr and not ray_imported


def test_space_becomes_tune_distributions_with_int_range_inclusive():
    tune = TuneParams.model_validate(with_space({
        "model.method.diffusion_gan.t_max": {"int_range": [100, 101]},
        "model.method.diffusion_gan.d_target": {"uniform": [0.45, 0.8]},
        "train.optimizer.lr_g": {"loguniform": [1.0e-5, 1.0e-3]},
        "model.method.diffusion_gan.t_distribution": {"choice": ["priority", "uniform"]},
    }))
    space = param_space(tune)
    draws = {space["model.method.diffusion_gan.t_max"].sample() for _ in range(200)}
    assert draws == {100, 101}
    assert 0.45 <= space["model.method.diffusion_gan.d_target"].sample() <= 0.8
    assert 1e-5 <= space["train.optimizer.lr_g"].sample() <= 1e-3
    assert trial_count(tune) == tune.num_samples


def test_grid_runs_every_combination_num_samples_times():
    tune = TuneParams.model_validate(with_space({
        "model.method.diffusion_gan.t_max": {"choice": [100, 250, 500]},
        "model.method.diffusion_gan.t_distribution": {"choice": ["priority", "uniform"]},
    }, search={"algorithm": "grid", "seed": 0}, num_samples=2))
    assert trial_count(tune) == 12
    space = param_space(tune)
    assert space["model.method.diffusion_gan.t_max"] == {"grid_search": [100, 250, 500]}


def test_the_sweep_folder_changes_with_what_shapes_results_only():
    tune = TuneParams.model_validate(shipped("tune"))
    model, train = shipped("model"), shipped("train")
    loader = shipped_params("data").loader
    base = fingerprint(tune, model, train, loader, "abc")
    same = [
        TuneParams.model_validate(shipped("tune", max_concurrent_trials=3)),
        TuneParams.model_validate(shipped("tune", run={"storage_path": "s3://bucket/sweeps"})),
        TuneParams.model_validate(shipped("tune", trial={"cpus_per_worker": 4, "use_gpu": True})),
    ]
    for other in same:
        assert fingerprint(other, model, train, loader, "abc") == base
    assert fingerprint(tune, model, shipped("train", run={"max_failures": 9}), loader, "abc") == base
    different = [
        fingerprint(TuneParams.model_validate(shipped("tune", num_samples=7)), model, train, loader, "abc"),
        fingerprint(TuneParams.model_validate(shipped("tune", trial={"epochs": 2})), model, train, loader, "abc"),
        fingerprint(tune, shipped("model", method={"generator": {"ngf": 8}}), train, loader, "abc"),
        fingerprint(tune, model, shipped("train", seed=1), loader, "abc"),
        fingerprint(tune, model, train, loader, "other data"),
    ]
    assert base not in different and len(set(different)) == len(different)


def test_auto_concurrency_fills_the_cluster_and_the_search_algorithm_enforces_it(caplog):
    gpu_sweep = TuneParams.model_validate(shipped("tune", trial={"num_workers": 2}))
    assert concurrency(gpu_sweep, use_gpu=True, cluster={"CPU": 64, "GPU": 8}) == 4  # 8 GPUs: 4 trials of 2 workers
    assert "max_concurrent_trials" not in caplog.text
    # GPU nodes scaled to 0 (an autoscaling cluster between jobs): one at a time, and it says so
    assert concurrency(gpu_sweep, use_gpu=True, cluster={"CPU": 4}) == 1
    assert "max_concurrent_trials is auto and the cluster has no GPUs for a trial now" in caplog.text
    assert concurrency(gpu_sweep, use_gpu=False, cluster={"CPU": 2}) == 1
    assert concurrency(TuneParams.model_validate(shipped("tune")), use_gpu=False, cluster={"CPU": 2}) == 2
    fixed = TuneParams.model_validate(shipped("tune", max_concurrent_trials=3))
    assert concurrency(fixed, use_gpu=False, cluster={"CPU": 64}) == 3
    # Tune ignores TuneConfig's limit when handed a ready generator: the limit must be in it.
    assert search_algorithm(fixed, 3).max_concurrent == 3


class RecordedStops:
    """Stands in for the sweep's StopRequests actor (ray.get_actor / .remote / ray.get)."""

    def __init__(self) -> None:
        self.requested: set[str] = set()
        self.request = SimpleNamespace(remote=self.requested.add)
        self.is_requested = SimpleNamespace(remote=lambda trial_id: trial_id in self.requested)


def test_asha_stops_on_the_validation_score_by_epoch_by_asking_the_trial(monkeypatch):
    import ray
    from ray.tune.schedulers import TrialScheduler

    stops = RecordedStops()
    monkeypatch.setattr(ray, "get_actor", lambda name: stops if name == stop_requests_name("sweep-1") else None)
    tune = TuneParams.model_validate(shipped("tune", trial={"epochs": 4}, scheduler={"grace_period": 1, "reduction_factor": 2.0}))
    asha = scheduler(tune, "sweep-1")
    asha.set_search_properties(tune.metric, tune.mode)
    good, weak, diverged = (SimpleNamespace(trial_id=name) for name in ("good", "weak", "diverged"))
    for trial in (good, weak, diverged):
        asha.on_trial_add(None, trial)
    # Trials report `epoch` (a resumed trial goes on counting), not Tune's iteration count.
    assert asha.on_trial_result(None, good, {"epoch": 1, "val/psnr": 12.0, "training_iteration": 7}) == TrialScheduler.CONTINUE
    # Below the rung's cut-off: Tune is told to go on, the trial is asked to stop (not killed).
    assert asha.on_trial_result(None, weak, {"epoch": 1, "val/psnr": 10.0, "training_iteration": 1}) == TrialScheduler.CONTINUE
    assert stops.requested == {"weak"}
    # A diverged trial's last report has no score: ASHA leaves it alone, the trial ends by itself.
    assert asha.on_trial_result(None, diverged, {"epoch": 1, "diverged": 1}) == TrialScheduler.CONTINUE
    # The last epoch: the trial finishes by itself (its final checkpoint), it is not stopped.
    assert asha.on_trial_result(None, good, {"epoch": 4, "val/psnr": 13.0}) == TrialScheduler.CONTINUE
    late = SimpleNamespace(trial_id="late")
    asha.on_trial_add(None, late)
    assert asha.on_trial_result(None, late, {"epoch": 4, "val/psnr": 1.0}) == TrialScheduler.CONTINUE
    assert stops.requested == {"weak"}


def test_a_stop_request_ends_the_workers_at_a_check_step(monkeypatch):
    import ray

    stops = RecordedStops()
    monkeypatch.setattr(ray, "get_actor", lambda name: stops)
    monkeypatch.setattr(ray, "get", lambda value: value)
    check = StopCheck("sweep-1", "weak", every=4)
    for step in range(1, 9):
        check(0, step)  # not requested: nothing happens
    stops.requested.add("weak")
    check(0, 5)  # not a check step
    with pytest.raises(StopRequested):
        check(0, 8)


def test_a_trial_trains_its_drawn_values_on_the_sweeps_data_storage_and_compile_cache(tmp_path, monkeypatch):
    import ray.tune
    import ray.tune.integration.ray_train

    from components.console import ConsoleOptions
    from components.training import driver
    from components.training.job import TrainingOutcome
    from components.tuning.trial import TrialPlan, run_trial

    space = sweep_space(params_folder(tmp_path / "params"))
    console = ConsoleOptions(verbose=True)
    plan = TrialPlan(space=space, loader=space.data.loader, data_location="s3://bucket/shards", data_checksum="sum-1",
                     dataset_size=40, train_storage="/runs/sweep-1/train", sweep_id="sweep-1",
                     compile_cache="/runs/compile-cache", console=console)
    trained = []

    def record_training(job, run, storage, callbacks):
        trained.append(SimpleNamespace(job=job, run=run, storage=storage, callbacks=callbacks))
        return TrainingOutcome(status="finished", epoch=1, step=5, metrics={})

    monkeypatch.setattr(driver, "run_training", record_training)
    monkeypatch.setattr(ray.tune, "get_context", lambda: SimpleNamespace(get_trial_id=lambda: "trial-7"))
    reporter = type("Reporter", (), {})  # Tune's callback only exists inside a Tune session
    monkeypatch.setattr(ray.tune.integration.ray_train, "TuneReportCallback", reporter)
    drawn = space.candidate_points()[-1]
    run_trial(drawn, plan)

    (training,) = trained
    model, train = space.resolve(drawn)
    assert (training.job.model, training.job.train) == (model, train)
    assert (training.job.data_location, training.job.data_checksum, training.job.dataset_size) == ("s3://bucket/shards", "sum-1", 40)
    assert training.job.compile_cache == "/runs/compile-cache"
    assert training.job.console == console
    assert training.job.step_hook.sweep_id == "sweep-1" and training.job.step_hook.trial_id == "trial-7"
    assert training.run.name == "trial-7" and training.storage == "/runs/sweep-1/train"
    assert [type(callback) for callback in training.callbacks] == [reporter]  # every epoch reaches ASHA
