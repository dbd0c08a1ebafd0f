"""Small prepared data sets for tests, made by the prepare stage's own components."""

from pathlib import Path

from components.config import with_overrides
from support.params import shipped

# params/data.yaml for tests: a few built-in pairs at 32 px (load size 36).
SMALL_DATA = {
    "source": {"kind": "builtin", "path": None, "builtin": {"train_pairs": 12, "val_pairs": 3, "test_pairs": 3}},
    "image_size": 32,
    "shard_max_count": 5,
    "loader": {"load_scale": 1.125, "num_threads": 1},
}


def prepare_small(folder: Path, **overrides: object) -> Path:
    """The built-in source prepared in `folder`/data (13 train, 2 val, 2 test pairs; SMALL_DATA
    with `overrides` merged in); returns the folder holding manifest.json."""
    from components.data.sources import open_source
    from components.data.writer import prepare_dataset

    counts = {"source": {"builtin": {"train_pairs": 13, "val_pairs": 2, "test_pairs": 2}}}
    params = shipped("data", **with_overrides(with_overrides(SMALL_DATA, counts), overrides))
    prepare_dataset(params, open_source(params, Path.cwd()), folder / "data", progress=False)
    return folder / "data"
