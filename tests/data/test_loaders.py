"""The DALI and PyTorch loaders: same tensors, a crop and flip shared by both halves, an even rank split."""

import json
import math

import pytest
import torch

from components.config.data import LoaderParams
from components.data.loaders import LoaderError, make_loader, resolve_backend
from components.data.manifest import ManifestError

BACKENDS = ["dali", "torch"]
JPEG_DECODER_TOLERANCE = 3 / 127.5  # two libjpeg builds may round a few pixels differently


def full_frames(prepared, backend: str, split: str = "train") -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """index -> (source, target) at the stored size, no augmentation."""
    loader = make_loader(prepared, split, LoaderParams(backend=backend, load_size=32, crop_size=32), batch_size=4, train=False)
    frames = {}
    for batch in loader:
        for i, index in enumerate(batch["index"].tolist()):
            frames[index] = (batch["source"][i], batch["target"][i])
    return frames


@pytest.mark.parametrize("backend", BACKENDS)
def test_evaluation_batches_follow_the_batch_contract(prepared_builtin, backend):
    loader = make_loader(prepared_builtin, "train", LoaderParams(backend=backend, load_size=32, crop_size=32),
                         batch_size=4, train=False)
    batches = list(loader)
    assert loader.backend == backend and len(loader) == len(batches) == math.ceil(13 / 4)
    assert [b["source"].shape[0] for b in batches] == [4, 4, 4, 1]  # every sample once, last batch partial
    first = batches[0]
    assert first["source"].dtype == first["target"].dtype == torch.float32
    assert first["source"].shape == first["target"].shape == (4, 3, 32, 32)
    assert first["index"].dtype == torch.int64 and first["crop"].dtype == torch.int64 and first["flip"].dtype == torch.bool
    assert torch.cat([b["index"] for b in batches]).tolist() == list(range(13))
    assert not any(b["flip"].any() for b in batches) and not any(b["crop"].any() for b in batches)
    values = torch.cat([b["target"].flatten() for b in batches])
    assert values.min() >= -1 and values.max() <= 1 and values.min() < -0.5 and values.max() > 0.5


def test_both_backends_give_the_same_tensors_without_augmentation(prepared_builtin):
    dali, plain = full_frames(prepared_builtin, "dali"), full_frames(prepared_builtin, "torch")
    assert sorted(dali) == sorted(plain) == list(range(13))
    for index in dali:
        for half in (0, 1):
            difference = (dali[index][half] - plain[index][half]).abs()
            assert difference.max() <= JPEG_DECODER_TOLERANCE, (index, half, difference.max())
    assert not torch.equal(dali[0][0], dali[0][1])  # source and target really differ


@pytest.mark.parametrize("backend", BACKENDS)
def test_crop_and_flip_are_the_same_for_source_and_target_and_reported(prepared_builtin, backend):
    frames = full_frames(prepared_builtin, backend)
    # load_size = stored size: the training crop is an exact window of the un-augmented frame
    loader = make_loader(prepared_builtin, "train", LoaderParams(backend=backend, load_size=32, crop_size=24),
                         batch_size=4, train=True, seed=3)
    assert len(loader) == 13 // 4
    crops, flips = set(), set()
    for _ in range(2):
        for batch in loader:
            assert batch["source"].shape == (4, 3, 24, 24)
            for i, index in enumerate(batch["index"].tolist()):
                top, left = batch["crop"][i].tolist()
                flip = bool(batch["flip"][i])
                crops.add((top, left))
                flips.add(flip)
                for half, key in ((0, "source"), (1, "target")):
                    expected = frames[index][half][:, top : top + 24, left : left + 24]
                    if flip:
                        expected = expected.flip(-1)
                    assert (batch[key][i] - expected).abs().max() <= 1e-6, (backend, index, key, top, left, flip)
    assert flips == {True, False} and len(crops) > 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_resize_to_load_size_then_crop(prepared_builtin, backend):
    loader = make_loader(prepared_builtin, "train", LoaderParams(backend=backend, load_size=40, crop_size=32),
                         batch_size=4, train=True)
    batch = next(iter(loader))
    assert batch["source"].shape == (4, 3, 32, 32)
    assert 0 <= batch["crop"].min() and batch["crop"].max() <= 8


@pytest.mark.parametrize("backend", BACKENDS)
def test_ranks_own_fixed_disjoint_parts_with_equal_batch_counts(prepared_builtin, backend):
    params = LoaderParams(backend=backend, load_size=32, crop_size=32)
    loaders = [make_loader(prepared_builtin, "train", params, batch_size=2, train=True, rank=r, world_size=2) for r in (0, 1)]
    assert [len(loader) for loader in loaders] == [3, 3]  # 13 samples: ranks own 6 and 7, both run 3 steps
    assert [loader.owned for loader in loaders] == [range(0, 6), range(6, 13)]
    for loader in loaders:
        for _ in range(2):
            seen = [index for batch in loader for index in batch["index"].tolist()]
            assert len(seen) == 6 and len(set(seen)) == 6 and set(seen) <= set(loader.owned)


def test_dali_epoch_after_an_early_break_is_complete(prepared_builtin):
    loader = make_loader(prepared_builtin, "train", LoaderParams(backend="dali", load_size=32, crop_size=32),
                         batch_size=2, train=True, world_size=2, rank=1)
    for _ in loader:
        break
    for _ in range(2):
        assert len(list(loader)) == len(loader) == 3


def test_auto_backend_picks_dali_when_installed():
    assert resolve_backend("auto", torch.device("cpu")) == resolve_backend("auto", torch.device("cuda")) == "dali"


def test_loader_errors_name_the_problem(prepared_builtin, tmp_path):
    params = LoaderParams(load_size=32, crop_size=32)
    with pytest.raises(LoaderError, match="has 13 samples: 2 rank"):
        make_loader(prepared_builtin, "train", params, batch_size=7, train=True, world_size=2)
    with pytest.raises(LoaderError, match="rank 2 is not in 0..1"):
        make_loader(prepared_builtin, "train", params, batch_size=1, train=True, rank=2, world_size=2)
    with pytest.raises(KeyError, match="no split 'holdout'"):
        make_loader(prepared_builtin, "holdout", params, batch_size=1, train=False)
    with pytest.raises(ManifestError, match="run `pairgan prepare` first"):
        make_loader(tmp_path, "train", params, batch_size=1, train=False)
    edited = json.loads((prepared_builtin / "manifest.json").read_text())
    edited["image_size"] = 64
    (tmp_path / "manifest.json").write_text(json.dumps(edited))
    with pytest.raises(ManifestError, match="checksum mismatch"):
        make_loader(tmp_path, "train", params, batch_size=1, train=False)


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_a_resumed_training_worker_gets_the_draws_of_the_epoch_it_resumes_at(prepared_builtin, backend):
    from types import SimpleNamespace

    from components.training.worker import ObservedLoader

    params = LoaderParams(backend=backend, load_size=32, crop_size=24)

    def draws(batches):
        return [(b["index"].tolist(), b["crop"].tolist(), b["flip"].tolist()) for b in batches]

    uninterrupted = make_loader(prepared_builtin, "train", params, batch_size=4, train=True, seed=5)
    epochs = [draws(uninterrupted) for _ in range(3)]
    assert epochs[2] != epochs[0]
    resumed = ObservedLoader(make_loader(prepared_builtin, "train", params, batch_size=4, train=True, seed=5),
                              0, None, SimpleNamespace(epoch=2, step=0))
    assert draws(resumed) == epochs[2]
