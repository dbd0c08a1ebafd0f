"""The cross-worker pieces of the Ray worker, in two plain gloo processes (no Ray start-up).

- the divergence verdict is the same on every rank even when only one rank saw the NaN
  (a rank stopping alone would leave the other waiting in DDP's all-reduce);
- ATME's memory gathered for a checkpoint (the method's state hook) takes each entry from the
  rank that wrote it.
"""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from components.methods.atme import ATMEMemory
from components.training.collectives import AgreeingDetector, all_reduce_sum
from components.training.health import TrainingDiverged
from support.params import shipped


def _worker(rank: int, init_file: str, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        detector = AgreeingDetector(shipped("train", health={"check_interval": 1}).health, torch.device("cpu"))
        loss = torch.tensor(float("nan") if rank == 1 else 0.7)
        detector.observe({"loss/D": loss})
        try:
            detector.check(step=5)
            verdict = "continued"
        except TrainingDiverged as diverged:
            verdict = diverged.reason

        # 4 samples: since the resume rank 0 wrote samples 0 and 1, rank 1 sample 2; nobody
        # wrote sample 3, which both ranks hold as loaded from the checkpoint.
        memory = ATMEMemory(dataset_size=4, map_size=2, patch_stride=8, crop_margin=0, device=torch.device("cpu"))
        memory.load_state_dict({"maps": torch.full((4, 2, 2), 0.5 + rank),  # what each rank held before writing
                                "owned": torch.tensor([False, False, False, True])})
        mine = torch.tensor([0, 1] if rank == 0 else [2])
        logits = -(10 * rank + mine).float()[:, None, None, None].expand(-1, 1, 2, 2)  # D's logits as this rank wrote them
        memory.write(mine, torch.zeros(len(mine), dtype=torch.bool), torch.zeros(len(mine), 2, dtype=torch.long), logits)
        gathered = memory.state_dict(gather=all_reduce_sum)
        results[rank] = (verdict, gathered["maps"].clone(), gathered["owned"].clone())
    finally:
        dist.destroy_process_group()


def test_both_ranks_stop_when_one_sees_nan_and_memory_entries_come_from_their_writer(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(str(tmp_path / "rendezvous"), results), nprocs=2, join=True)

    for rank in (0, 1):
        verdict, maps, owned = results[rank]
        assert "NaN" in verdict, f"rank {rank} did not stop: {verdict}"
        assert torch.equal(maps[0], torch.full((2, 2), 0.0)) and torch.equal(maps[1], torch.full((2, 2), -1.0))
        assert torch.equal(maps[2], torch.full((2, 2), -12.0))  # from rank 1, the only writer
        # Nobody wrote sample 3 since the resume: each rank keeps its own (loaded) value...
        assert torch.equal(maps[3], torch.full((2, 2), 0.5 + rank))
        # ...and it stays marked as written by the checkpoint it came from.
        assert owned.tolist() == [True, True, True, True]
