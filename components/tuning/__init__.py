"""Ray Tune sweeps over params/model.yaml and params/train.yaml (`pairgan tune`, docs/tuning.md).

- `space.py`: the search space against the params schemas, checked before any trial starts;
- `trial.py`: one trial, a function that fits a Ray Train `TorchTrainer` and forwards its reports to Tune;
- `sweep.py`: the Tuner (search algorithm, ASHA, resources, resume of an interrupted sweep);
- `outcomes.py`: how each trial ended (finished, stopped early, diverged, failed) and its score;
- `tracking.py`: MLflow, one parent run per sweep and one child run per trial;
- `report.py`: the results table, the plot, the best trial's params;
- `adopt.py`: writing those params into params/*.yaml, keeping the files' comments.
"""
