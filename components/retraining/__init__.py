"""`pairgan retrain`: one retraining cycle (cycle.py), the state it keeps between runs (state.py),
what is new in the source (source_changes.py), and the DVC commands it runs (dvc_commands.py)."""
