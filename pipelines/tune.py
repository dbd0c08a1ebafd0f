"""Stage tune: a Ray Tune sweep over params/model.yaml and params/train.yaml, as params/tune.yaml says.

    pairgan tune [--params-dir params] [--data data/prepared] [--out reports/tune]
    pairgan tune --apply reports/tune/best_params.yaml [--params-dir params]

Every trial trains with Ray Train on the prepared shards and reports its validation score per
epoch; ASHA stops the weak ones early. Writes into --out: results.csv (one row per trial),
metric_vs_params.png, summary.json (outcome counts, the best trial) and best_params.yaml (the
best trial's values per params file). MLflow: one parent run per sweep, a child run per trial.
Running the same command again resumes an interrupted sweep. `--apply` writes a best_params
file into the params files, keeping their comments, and prints the equivalent `dvc exp run`.
Ray starts locally unless RAY_ADDRESS is set; MLflow logs to MLFLOW_TRACKING_URI, else to
sqlite:///<cwd>/mlflow.db. Documented in docs/tuning.md.

Exit status: 0 done (best params written); 1 failed (no trial finished with a score, the data
or the MLflow store unusable, the sweep interrupted); 2 invalid params (nothing ran); 3 every
trial diverged.
"""

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from components.atomic_files import write_bytes_atomic
from components.config import (
    ParamsError,
    load_params,
    parse_yaml_mapping,
    read_params_text,
    read_yaml_mapping,
    validate_params,
)
from components.config.data import READS_SHARDS_ONLY, DataParams, check_prepared_size
from components.config.model import load_model_params, validate_model_params
from components.config.train import TrainParams
from components.config.tune import TuneParams
from components.console import ConsoleOptions
from components.data.manifest import ManifestError, load_manifest
from components.object_store import is_s3_uri
from components.redaction import redact_uri
from components.tracking import (
    TAG_GIT_COMMIT,
    TAG_MANIFEST_CHECKSUM,
    TrackingUnavailable,
    check_tracking_reachable,
    flatten_params,
    git_commit,
)
from components.tuning.adopt import AdoptError, apply_values, dvc_exp_command
from components.tuning.space import SweepSpace
from pipelines import environment
from pipelines.exit_status import ExitStatus
from pipelines.ray_connection import RayStartFailed, connect_ray, warn_if_auto_sees_no_gpu

logger = logging.getLogger("pairgan.tune")

ADOPTABLE = ("model.yaml", "train.yaml")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="data/prepared", help="prepared data folder (default: data/prepared)")
    parser.add_argument("--out", default="reports/tune", help="folder for the results table, plot, summary and best params")
    parser.add_argument(
        "--apply", metavar="BEST_PARAMS", default=None,
        help="write this best_params.yaml into the params files (keeping their comments) instead of sweeping",
    )


def apply_best_params(best_file: Path, params_dir: Path) -> int:
    """Write each file's values of `best_file` into params_dir, all files or none."""
    document = read_yaml_mapping(best_file)
    unknown = [name for name in document if name not in ADOPTABLE]
    if unknown:
        raise ParamsError(best_file, [(name, f"not a params file a sweep sets (expected {', '.join(ADOPTABLE)})") for name in unknown])
    data_path = params_dir / "data.yaml"
    data = load_params(data_path, DataParams, context=READS_SHARDS_ONLY)  # the model's image size
    edited, current = {}, {}
    for name, values in document.items():
        if not isinstance(values, dict):
            raise ParamsError(best_file, [(name, "must map dotted keys to values")])
        path = params_dir / name
        text = read_params_text(path)
        current[name] = parse_yaml_mapping(text, path)  # a missing, empty or duplicated-key file is refused here
        try:
            edited[path] = apply_values(text, values, str(path))
        except AdoptError as error:
            print(f"pairgan tune: {error}", file=sys.stderr)
            return ExitStatus.BAD_PARAMS
        # The edited file must still be valid params, before anything is written.
        content = parse_yaml_mapping(edited[path], path)
        if name == "model.yaml":
            validate_model_params(content, data, path, data_path)
        else:
            validate_params(content, TrainParams, path)
    for path, text in edited.items():
        write_bytes_atomic(path, text.encode("utf-8"))
    for name, values in document.items():
        for key, value in values.items():
            print(f"{params_dir / name}: {key} = {value!r}")
    print("the same change as a DVC experiment (DVC rewrites the files with its own YAML library):")
    print("  " + dvc_exp_command(document, str(params_dir), current))
    return ExitStatus.OK


def run(args: argparse.Namespace) -> int:
    params_dir = Path(args.params_dir)
    if args.apply:
        return apply_best_params(Path(args.apply), params_dir)
    tune_path, model_path = params_dir / "tune.yaml", params_dir / "model.yaml"
    train_path, data_path = params_dir / "train.yaml", params_dir / "data.yaml"
    tune = load_params(tune_path, TuneParams)
    data = load_params(data_path, DataParams, context=READS_SHARDS_ONLY)
    load_model_params(model_path, data, data_path)  # the base files are valid on their own
    load_params(train_path, TrainParams)
    space = SweepSpace(tune, read_yaml_mapping(model_path), read_yaml_mapping(train_path), data,
                       str(tune_path), str(model_path), str(train_path), str(data_path))
    space.check()
    _, trial_train = space.resolve(space.candidate_points()[0])
    if trial_train.validation.samples == 0:
        raise ParamsError(train_path, [("validation.samples", f"is 0, but {tune_path} ranks trials on {tune.metric}, "
                                        "the validation score: set it to 8 or more")])

    # Imported here: they load Ray and torch (seconds), which a params error above need not wait for.
    from components.training.validation import VALIDATION_SPLIT
    from components.tuning.sweep import SearchUnavailable, check_search_available

    try:
        check_search_available(tune)
    except SearchUnavailable as error:
        print(f"pairgan tune: {tune_path}: {error}", file=sys.stderr)
        return ExitStatus.BAD_PARAMS
    try:
        manifest = load_manifest(args.data)
        train_count = manifest.split("train").count
    except (ManifestError, KeyError, FileNotFoundError) as error:
        print(f"pairgan tune: {error}", file=sys.stderr)
        return ExitStatus.FAILED
    check_prepared_size(data, manifest.image_size, data_path, args.data)
    validation_split = manifest.splits.get(VALIDATION_SPLIT)
    if validation_split is None or validation_split.count == 0:
        print(f"pairgan tune: {args.data} has no {VALIDATION_SPLIT!r} samples to score trials on: give prepare a val "
              f"split (params/data.yaml val_fraction, or a val/ folder in the source)", file=sys.stderr)
        return ExitStatus.FAILED
    tracking_uri = environment.tracking_uri()
    try:
        check_tracking_reachable(tracking_uri, tune.run.experiment)
    except TrackingUnavailable as error:
        print(f"pairgan tune: {error}", file=sys.stderr)
        return ExitStatus.FAILED
    logger.info("MLflow: %s, experiment %r", redact_uri(tracking_uri), tune.run.experiment)
    return _sweep(args, tune, space, data, manifest, train_count, tracking_uri)


def _sweep(args, tune: TuneParams, space: SweepSpace, data: DataParams, manifest, train_count: int, tracking_uri: str) -> int:
    console = ConsoleOptions(verbose=args.verbose, interactive=sys.stdout.isatty())
    ray_address = environment.ray_address()
    ray_workers_environment = environment.ray_console(console, ray_address)  # before ray is imported
    # Imported here: Ray takes seconds to import, and params errors should not wait for it.
    import ray

    from components.training.compile_cache import compile_cache_location
    from components.training.driver import resolve_use_gpu
    from components.tuning.outcomes import count_outcomes, summarise
    from components.tuning.report import BEST_FILE, RESULTS_FILE, sweep_files
    from components.tuning.sweep import TRAIN_RUNS, concurrency, fingerprint, run_sweep, trial_count, trial_records
    from components.tuning.tracking import SweepTracker, finish_runs, start_parent_run
    from components.tuning.trial import TrialPlan

    # Started before the sweep's MLflow run: a Ray that does not start leaves no run behind.
    try:
        connect_ray(ray_address, ray_workers_environment, console.verbose)
    except RayStartFailed as error:
        print(f"pairgan tune: {error}", file=sys.stderr)
        return ExitStatus.FAILED
    # Trials report the metric only on validated epochs, and a diverged trial's last report has
    # none: Tune must not treat a result without it as an error.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    SweepTracker.connect(tracking_uri)
    sweep_id = f"{tune.run.name}-{fingerprint(tune, space.base_model, space.base_train, data.loader, manifest.checksum)}"
    storage = environment.absolute_storage_path(tune.run.storage_path)
    tags = {TAG_MANIFEST_CHECKSUM: manifest.checksum, "pairgan.method": space.resolve(space.candidate_points()[0])[0].method.name}
    commit = git_commit(Path.cwd())
    if commit:
        tags[TAG_GIT_COMMIT] = commit
    parent_params = flatten_params({"tune": tune.model_dump(mode="json")})
    start_parent_run(tune.run.experiment, sweep_id, parent_params, tags)

    cluster = ray.cluster_resources()
    warn_if_auto_sees_no_gpu(tune.trial.use_gpu, ray_address, cluster,
                             f"{Path(args.params_dir) / 'tune.yaml'}: trial.use_gpu")
    use_gpu = resolve_use_gpu(tune.trial.use_gpu, cluster)
    plan = TrialPlan(space=space, loader=data.loader,
                     data_location=args.data if is_s3_uri(args.data) else str(Path(args.data).resolve()),
                     data_checksum=manifest.checksum, dataset_size=train_count,
                     train_storage=f"{storage}/{sweep_id}/{TRAIN_RUNS}", sweep_id=sweep_id, console=console,
                     compile_cache=compile_cache_location(storage))
    tracker = SweepTracker(tune.run.experiment, sweep_id, space, tags, trial_count(tune))
    started = time.monotonic()
    experiment_path = run_sweep(tune, plan, storage, sweep_id, [tracker], concurrency(tune, use_gpu, cluster))
    wall = time.monotonic() - started

    summaries = [summarise(record, tune.metric, tune.mode, tune.scope, tune.trial.epochs)
                 for record in trial_records(experiment_path)]
    out = Path(args.out)
    best_file = out / BEST_FILE
    files, best = sweep_files(summaries, space, tune, sweep_id, experiment_path, wall,
                              f"pairgan tune --apply {best_file} --params-dir {args.params_dir}")
    out.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        write_bytes_atomic(out / name, content)
    if best is None and best_file.exists():
        best_file.unlink()  # a stale best from another sweep must not be applied by mistake
    counts = count_outcomes(summaries)

    parent_metrics = {f"trials_{outcome}": count for outcome, count in counts.items()}
    if best is not None:
        parent_metrics[f"best_{tune.metric}"] = best.score
    parent_tags = {"pairgan.best_trial": best.trial_id if best else "", "pairgan.sweep_path": experiment_path}
    finish_runs(tracker, summaries, parent_metrics, parent_tags, files, finished=counts["unfinished"] == 0)

    logger.info("sweep %s: %d trials in %.0f s: %s", sweep_id, len(summaries), wall,
                ", ".join(f"{count} {outcome}" for outcome, count in counts.items()))
    if counts["unfinished"]:
        print(f"pairgan tune: the sweep was interrupted with {counts['unfinished']} trial(s) unfinished; run the same "
              "command again to resume it", file=sys.stderr)
        return ExitStatus.FAILED
    if best is None:
        every_trial_diverged = counts["diverged"] == len(summaries)
        print(f"pairgan tune: no trial finished with a {tune.metric} score ({', '.join(f'{c} {o}' for o, c in counts.items() if c)}); "
              f"see {out / RESULTS_FILE}", file=sys.stderr)
        return ExitStatus.DIVERGED if every_trial_diverged else ExitStatus.FAILED
    logger.info("best trial %s: %s %.4f with %s; written to %s", best.trial_id, tune.metric, best.score,
                best.record.values, best_file)
    print(f"apply the best params: pairgan tune --apply {best_file} --params-dir {args.params_dir}")
    return ExitStatus.OK
