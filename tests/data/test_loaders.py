"""The DALI and PyTorch loaders: same tensors, a crop and flip shared by both halves, an even rank split."""

import io
import json
import math

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from components.data.loaders import LoaderError, make_loader, resolve_backend
from components.data.manifest import ManifestError, load_manifest
from components.data.torch_loader import sample_index
from support.params import shipped

BACKENDS = ["dali", "torch"]
JPEG_DECODER_TOLERANCE = 3 / 127.5  # two libjpeg builds may round a few pixels differently


def loader_params(backend: str = "auto", load_scale: float = 1.0):
    """The shipped loader params with this backend and load scale (1.0: training resizes nothing, crops nothing)."""
    return shipped("data", loader={"backend": backend, "load_scale": load_scale}).loader


def full_frames(prepared, backend: str, split: str = "train") -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """index -> (source, target) at the stored size, no augmentation."""
    loader = make_loader(prepared, split, loader_params(backend), batch_size=4, train=False)
    frames = {}
    for batch in loader:
        for i, index in enumerate(batch["index"].tolist()):
            frames[index] = (batch["source"][i], batch["target"][i])
    return frames


@pytest.mark.parametrize("backend", BACKENDS)
def test_evaluation_batches_follow_the_batch_contract(prepared_builtin, backend):
    loader = make_loader(prepared_builtin, "train", loader_params(backend),
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


@pytest.mark.parametrize("prepared", ["prepared_builtin", "prepared_subsampled"])
def test_both_backends_give_the_same_tensors_without_augmentation(prepared, request):
    prepared = request.getfixturevalue(prepared)
    dali, plain = full_frames(prepared, "dali"), full_frames(prepared, "torch")
    assert sorted(dali) == sorted(plain) == list(range(13))
    for index in dali:
        for half in (0, 1):
            difference = (dali[index][half] - plain[index][half]).abs()
            assert difference.max() <= JPEG_DECODER_TOLERANCE, (index, half, difference.max())
    assert not torch.equal(dali[0][0], dali[0][1])  # source and target really differ


def resized_frames(prepared, size: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """index -> (source, target): the stored JPEGs resized to size x size with Pillow, as the torch loader does."""
    frames = {}
    for shard in load_manifest(prepared).split("train").shards:
        for sample in wds.WebDataset(str(prepared / shard.tar), shardshuffle=False, empty_check=False):
            halves = []
            for member in ("src.jpg", "tgt.jpg"):
                image = Image.open(io.BytesIO(sample[member])).convert("RGB").resize((size, size), Image.BILINEAR)
                halves.append(torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(127.5).sub(1.0))
            frames[sample_index(sample)] = (halves[0], halves[1])
    return frames


@pytest.mark.parametrize("backend", BACKENDS)
def test_crop_and_flip_are_the_same_for_source_and_target_and_reported(prepared_builtin, backend):
    # load_scale 1.25: the 32 px images are resized to 40, then a 32 px window is cut. The
    # torch loader must give exactly the reported window of the Pillow-resized image; DALI
    # resamples slightly differently, so its reported window must be the best match of all
    # 9 x 9 x 2 possible ones for the target (a photo) and as close for the source.
    frames = resized_frames(prepared_builtin, 40)
    loader = make_loader(prepared_builtin, "train", loader_params(backend, load_scale=1.25), batch_size=4, train=True,
                         seed=3)
    assert len(loader) == 13 // 4
    crops, flips = set(), set()

    def window(full: torch.Tensor, top: int, left: int, flip: bool) -> torch.Tensor:
        cut = full[:, top : top + 32, left : left + 32]
        return cut.flip(-1) if flip else cut

    for _ in range(2):
        for batch in loader:
            assert batch["source"].shape == (4, 3, 32, 32)
            for i, index in enumerate(batch["index"].tolist()):
                top, left = batch["crop"][i].tolist()
                flip = bool(batch["flip"][i])
                crops.add((top, left))
                flips.add(flip)
                for half, key in ((0, "source"), (1, "target")):
                    error = (batch[key][i] - window(frames[index][half], top, left, flip)).abs()
                    if backend == "torch":
                        assert error.max() <= 1e-6, (backend, index, key, top, left, flip)
                        continue
                    assert error.mean() <= 0.005, (backend, index, key, top, left, flip, error.mean())
                    if key == "target":
                        others = min((batch[key][i] - window(frames[index][half], t, l, f)).abs().mean()
                                     for t in range(9) for l in range(9) for f in (False, True) if (t, l, f) != (top, left, flip))
                        assert others > error.mean(), (index, top, left, flip)
    assert flips == {True, False} and len(crops) > 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_resize_to_load_size_then_crop(prepared_builtin, backend):
    loader = make_loader(prepared_builtin, "train", loader_params(backend, load_scale=1.25),
                         batch_size=4, train=True)
    batch = next(iter(loader))
    assert batch["source"].shape == (4, 3, 32, 32)
    assert 0 <= batch["crop"].min() and batch["crop"].max() <= 8


@pytest.mark.parametrize("backend", BACKENDS)
def test_ranks_own_fixed_disjoint_parts_with_equal_batch_counts(prepared_builtin, backend):
    params = loader_params(backend)
    loaders = [make_loader(prepared_builtin, "train", params, batch_size=2, train=True, rank=r, world_size=2) for r in (0, 1)]
    assert [len(loader) for loader in loaders] == [3, 3]  # 13 samples: ranks own 6 and 7, both run 3 steps
    assert [loader.owned for loader in loaders] == [range(0, 6), range(6, 13)]
    for loader in loaders:
        for _ in range(2):
            seen = [index for batch in loader for index in batch["index"].tolist()]
            assert len(seen) == 6 and len(set(seen)) == 6 and set(seen) <= set(loader.owned)


def test_dali_epoch_after_an_early_break_is_complete(prepared_builtin):
    loader = make_loader(prepared_builtin, "train", loader_params("dali"),
                         batch_size=2, train=True, world_size=2, rank=1)
    for _ in loader:
        break
    for _ in range(2):
        assert len(list(loader)) == len(loader) == 3


def test_auto_backend_picks_dali_when_installed():
    assert resolve_backend("auto", torch.device("cpu")) == resolve_backend("auto", torch.device("cuda")) == "dali"


def test_loader_errors_name_the_problem(prepared_builtin, tmp_path):
    params = loader_params()
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

    params = loader_params(backend, load_scale=1.25)

    def draws(batches):
        return [(b["index"].tolist(), b["crop"].tolist(), b["flip"].tolist()) for b in batches]

    uninterrupted = make_loader(prepared_builtin, "train", params, batch_size=4, train=True, seed=5)
    epochs = [draws(uninterrupted) for _ in range(3)]
    assert epochs[2] != epochs[0]
    resumed = ObservedLoader(make_loader(prepared_builtin, "train", params, batch_size=4, train=True, seed=5),
                              0, None, SimpleNamespace(epoch=2, step=0))
    assert draws(resumed) == epochs[2]
