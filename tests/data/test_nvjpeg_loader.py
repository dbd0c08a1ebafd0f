"""The nvJPEG loader: the paired crop and flip on tensors, the torch backend's draws and pixels,
epochs and ranks, errors; on a GPU, nvJPEG decoding against the CPU decoding of the same loader.

Without torchvision (the CPU torch here) the loader runs with Pillow decoding (`pil_decode`):
everything but the decoder call is the code that runs on the GPU.
"""

import io
import shutil
import tarfile
import threading
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from components.config.data import LoaderParams
from components.data import loaders
from components.data.integrity import DataError
from components.data.loaders import (
    LoaderError,
    LocalShard,
    make_loader,
    owned_indices,
    resolve_backend,
    shard_cache,
    verified_shards,
)
from components.data.manifest import load_manifest
from components.data.nvjpeg_loader import NvjpegPairLoader, pil_decode, resize_crop_flip
from support.params import shipped

JPEG_DECODER_TOLERANCE = 3 / 127.5  # two JPEG decoders may round a few pixels differently
# Bilinear resizing mixes neighbours with weights summing to 1, so it keeps that bound, up to
# float rounding of the same interpolation on two devices.
RESIZED_TOLERANCE = JPEG_DECODER_TOLERANCE + 1e-5
CPU = torch.device("cpu")


def shard_files(prepared: Path) -> list[Path]:
    return sorted((Path(prepared) / "train").glob("train-*.tar"))


def loader_params(load_scale: float, backend: str = "auto", **others) -> LoaderParams:
    """The shipped loader params with this load scale (1.0: training resizes nothing, crops nothing)."""
    return shipped("data", loader={"backend": backend, "load_scale": load_scale, **others}).loader


def pil_loader(prepared: Path, params: LoaderParams, batch_size: int, train: bool, rank: int = 0, world_size: int = 1,
               seed: int = 0, device: torch.device = CPU) -> NvjpegPairLoader:
    """The nvjpeg loader with Pillow decoding, over the verified shards of the train split as make_loader builds it."""
    manifest = load_manifest(prepared)
    owned = owned_indices(manifest.split("train").count, rank, world_size)
    shards, pin = verified_shards(manifest, "train", owned, shard_cache(params))
    return NvjpegPairLoader(manifest, "train", shards, pin, params, batch_size, train, rank, world_size, seed, device,
                            pil_decode)


def unverified_loader(prepared: Path, params: LoaderParams, batch_size: int, train: bool) -> NvjpegPairLoader:
    """The loader over shards taken as they are: a malformed shard that its manifest vouches for
    (written by another tool) reaches the loader's own checks."""
    manifest = load_manifest(prepared)
    shards = [LocalShard(Path(prepared) / entry.tar, entry, entry.tar, range(entry.first_index, entry.first_index + entry.count))
              for entry in manifest.split("train").shards]
    return NvjpegPairLoader(manifest, "train", shards, shard_cache(params).pin([]), params, batch_size, train, 0, 1, 0,
                            CPU, pil_decode)


def by_index(batches) -> dict[int, tuple]:
    """index -> (crop, flip, source, target) of every sample seen."""
    seen = {}
    for batch in batches:
        for row, index in enumerate(batch["index"].tolist()):
            seen[index] = (batch["crop"][row].tolist(), bool(batch["flip"][row]),
                           batch["source"][row].cpu(), batch["target"][row].cpu())
    return seen


def test_crop_and_flip_take_the_same_window_of_both_halves():
    generator = torch.Generator().manual_seed(0)
    halves = torch.randint(0, 256, (2, 3, 3, 10, 10), dtype=torch.uint8, generator=generator)
    crops = torch.tensor([[0, 0], [2, 1], [3, 3]])
    flips = torch.tensor([False, True, True])
    out = resize_crop_flip(halves, 10, crops, flips, 7)
    assert out.shape == (2, 3, 3, 7, 7) and out.dtype == torch.float32
    for side in (0, 1):
        for row, ((top, left), flip) in enumerate(zip(crops.tolist(), flips.tolist())):
            expected = halves[side, row, :, top : top + 7, left : left + 7].float() / 127.5 - 1
            if flip:
                expected = expected.flip(-1)
            assert torch.equal(out[side, row], expected), (side, row)


def test_resizing_happens_before_the_crop():
    halves = torch.randint(0, 256, (2, 2, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    crops, flips = torch.tensor([[1, 2], [0, 3]]), torch.tensor([True, False])
    out = resize_crop_flip(halves, 12, crops, flips, 9)
    resized = F.interpolate(halves.reshape(4, 3, 8, 8).float(), size=(12, 12), mode="bilinear", align_corners=False)
    resized = resized.view(2, 2, 3, 12, 12) / 127.5 - 1
    for row, ((top, left), flip) in enumerate(zip(crops.tolist(), flips.tolist())):
        expected = resized[:, row, :, top : top + 9, left : left + 9]
        expected = expected.flip(-1) if flip else expected
        assert torch.allclose(out[:, row], expected, atol=1e-5)


def test_flips_and_pixels_are_the_torch_backends(prepared_builtin):
    # load scale 1: no resize and no crop, so both backends give the same decode, flipped alike
    params = loader_params(1.0, "torch")
    ours = by_index(pil_loader(prepared_builtin, params, 4, train=True, seed=3))
    theirs = by_index(make_loader(prepared_builtin, "train", params, 4, train=True, seed=3))
    common = set(ours) & set(theirs)
    assert len(ours) == 12 and len(common) >= 8
    assert {ours[i][1] for i in ours} == {True, False}
    for index in common:
        assert ours[index][:2] == theirs[index][:2] and ours[index][0] == [0, 0], index  # no crop, same flip
        assert torch.equal(ours[index][2], theirs[index][2]) and torch.equal(ours[index][3], theirs[index][3])


def test_resized_pairs_are_within_one_level_of_the_torch_backend(prepared_builtin):
    params = loader_params(1.25, "torch")  # 32 px resized to 40, 32 px windows
    ours = by_index(pil_loader(prepared_builtin, params, 4, train=True, seed=1))
    theirs = by_index(make_loader(prepared_builtin, "train", params, 4, train=True, seed=1))
    for index in set(ours) & set(theirs):
        assert ours[index][:2] == theirs[index][:2]
        for half in (2, 3):
            # Pillow rounds its resized image to uint8, torch interpolates in float
            assert (ours[index][half] - theirs[index][half]).abs().max() <= 1.01 / 127.5


def test_evaluation_batches_follow_the_batch_contract(prepared_builtin):
    loader = pil_loader(prepared_builtin, loader_params(1.25), 4, train=False)
    batches = list(loader)
    assert loader.backend == "nvjpeg" and len(loader) == len(batches) == 4
    assert [b["source"].shape[0] for b in batches] == [4, 4, 4, 1]
    first = batches[0]
    assert first["source"].shape == first["target"].shape == (4, 3, 32, 32)
    assert first["source"].dtype == torch.float32 and first["source"].is_contiguous()
    assert first["index"].dtype == first["crop"].dtype == torch.int64 and first["flip"].dtype == torch.bool
    assert torch.cat([b["index"] for b in batches]).tolist() == list(range(13))
    assert not any(b["flip"].any() or b["crop"].any() for b in batches)
    assert not torch.equal(first["source"], first["target"])


def test_ranks_own_fixed_parts_and_a_resumed_epoch_repeats_its_draws(prepared_builtin):
    params = loader_params(1.125)
    ranks = [pil_loader(prepared_builtin, params, 2, train=True, rank=rank, world_size=2, seed=5) for rank in (0, 1)]
    assert [len(loader) for loader in ranks] == [3, 3] and [loader.owned for loader in ranks] == [range(0, 6), range(6, 13)]

    def draws(loader):
        return [(b["index"].tolist(), b["crop"].tolist(), b["flip"].tolist()) for b in loader]

    epochs = [draws(ranks[1]) for _ in range(3)]
    orders = [[index for step in epoch for index in step[0]] for epoch in epochs]
    for order in orders:
        assert len(order) == len(set(order)) == 6 and set(order) <= set(range(6, 13))
    assert orders[0] != orders[1]  # a new order every epoch
    resumed = pil_loader(prepared_builtin, params, 2, train=True, rank=1, world_size=2, seed=5)
    resumed.set_epoch(2)
    assert draws(resumed) == epochs[2]


def test_stopping_early_ends_the_threads_and_the_next_epoch_is_complete(prepared_builtin):
    before = threading.active_count()
    loader = pil_loader(prepared_builtin, loader_params(1.0, prefetch=1), 2, train=True)
    for _ in loader:
        break
    assert threading.active_count() == before
    assert len(list(loader)) == len(loader) == 6
    assert threading.active_count() == before


def test_a_sample_without_its_target_names_the_shard_and_key(prepared_builtin, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(prepared_builtin, copy)
    shard = shard_files(copy)[0]
    with tarfile.open(shard) as archive:
        members = [(member, archive.extractfile(member).read()) for member in archive]
    broken_key = members[0][0].name.partition(".")[0]
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as archive:
        for member, data in members:
            if member.name != f"{broken_key}.tgt.jpg":
                archive.addfile(member, io.BytesIO(data))
    with pytest.raises(DataError, match=r"train-000000\.tar"):  # no longer the shard its manifest lists
        pil_loader(copy, loader_params(1.0), 2, train=True)
    with pytest.raises(LoaderError, match=rf"train-000000\.tar: sample '{broken_key}' has no tgt\.jpg member"):
        unverified_loader(copy, loader_params(1.0), 2, train=True)


def test_an_undecodable_image_is_refused_or_raises_in_the_training_loop(prepared_builtin, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(prepared_builtin, copy)
    shard = shard_files(copy)[0]
    with tarfile.open(shard) as archive:
        member = next(member for member in archive if member.name.endswith(".src.jpg"))
    with open(shard, "r+b") as handle:  # same size, garbage content: the tar stays readable
        handle.seek(member.offset_data)
        handle.write(b"\x00" * member.size)
    with pytest.raises(DataError, match=r"train-000000\.tar, sample .* does not decode"):
        pil_loader(copy, loader_params(1.0), 13, train=False)
    loader = unverified_loader(copy, loader_params(1.0), 13, train=False)
    before = threading.active_count()
    with pytest.raises(OSError, match="cannot identify image"):
        list(loader)
    assert threading.active_count() == before


def test_backend_choice_and_its_errors(monkeypatch):
    cuda = torch.device("cuda")
    with pytest.raises(LoaderError, match="nvjpeg, which decodes on a CUDA device, but this loader's device is cpu"):
        resolve_backend("nvjpeg", CPU)
    monkeypatch.setattr(loaders, "torchvision_available", lambda: False)
    with pytest.raises(LoaderError, match="nvjpeg but torchvision cannot be imported"):
        resolve_backend("nvjpeg", cuda)
    monkeypatch.setattr(loaders, "dali_available", lambda: False)
    assert resolve_backend("auto", cuda) == resolve_backend("auto", CPU) == "torch"
    monkeypatch.setattr(loaders, "torchvision_available", lambda: True)
    assert resolve_backend("auto", cuda) == "nvjpeg" and resolve_backend("auto", CPU) == "torch"
    assert resolve_backend("nvjpeg", cuda) == "nvjpeg"


@pytest.mark.cuda
@pytest.mark.parametrize("prepared", ["prepared_builtin", "prepared_subsampled"])
def test_gpu_decoding_gives_the_batches_of_cpu_decoding(prepared, request):
    prepared = request.getfixturevalue(prepared)
    params = loader_params(1.25, "nvjpeg")  # resize, crop and flip on the GPU
    gpu = make_loader(prepared, "train", params, 4, train=True, seed=2, device=torch.device("cuda"))
    assert gpu.backend == "nvjpeg"
    batches = list(gpu)
    assert all(batch[key].device.type == "cuda" for batch in batches for key in batch)
    ours, reference = by_index(batches), by_index(pil_loader(prepared, params, 4, train=True, seed=2))
    assert sorted(ours) == sorted(reference)
    for index in ours:
        assert ours[index][:2] == reference[index][:2]
        for half in (2, 3):
            assert (ours[index][half] - reference[index][half]).abs().max() <= RESIZED_TOLERANCE


@pytest.mark.cuda
def test_gpu_batches_are_complete_while_the_training_stream_is_busy(prepared_builtin):
    # The decoder thread fills the next batches on its own stream while this stream works:
    # a batch used before its decode finished would differ from a quiet pass over the same epoch.
    params = loader_params(1.125, "nvjpeg", prefetch=3)
    loader = make_loader(prepared_builtin, "train", params, 4, train=True, seed=4, device=torch.device("cuda"))
    loader.set_epoch(0)
    quiet = [{key: value.clone() for key, value in batch.items()} for batch in loader]
    busy = torch.randn(4096, 4096, device="cuda")
    loader.set_epoch(0)
    for expected, batch in zip(quiet, loader, strict=True):
        for _ in range(20):
            busy = busy @ busy / 64  # keep the consumer's stream busy while the next batch decodes
        for key in expected:
            assert torch.equal(batch[key], expected[key]), key


@pytest.mark.cuda
def test_auto_picks_nvjpeg_on_a_gpu_without_dali():
    if loaders.dali_available():
        pytest.skip("DALI is installed here: auto picks it")
    assert resolve_backend("auto", torch.device("cuda")) == "nvjpeg"
