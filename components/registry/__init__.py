"""The MLflow registry: how a translator is stored, loaded, gated, described and rolled back.

- `flavor`: the stored format (pt2 graph, pyfunc entry point for `mlflow models serve`);
- `loading`: loading a registered translator after checking it is that format, pickle off;
- `comparison`: the paired bootstrap of per-image scores;
- `lock`: the registry-provided lock that makes read-decide-set atomic;
- `gate`: logging, scoring, the champion/challenger decision and the alias moves;
- `model_card`: the registered version's description;
- `rollback`: moving `@champion` back to a sound version, with the reason on record.
"""
