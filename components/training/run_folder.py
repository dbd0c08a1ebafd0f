"""Ray Train's run folder (storage_path/run.name): what a killed training leaves in it.

Ray Train keeps the list of a run's checkpoints in `checkpoint_manager_snapshot.json` in the
run folder; a resumed run continues from the latest checkpoint listed there and deletes the
ones beyond `num_to_keep` as it reports new ones. A training killed while a checkpoint was
being written, or between Ray's update of that list and its deletion of the old checkpoints,
leaves `checkpoint_*` folders the list does not name: no run ever reads or deletes them again.
The latest checkpoint listed there is the one a resumed run continues from, so the driver can
read its record (`latest_checkpoint_info`) before it starts any Ray worker.
"""

import json
import logging
from dataclasses import dataclass

import pyarrow.fs

from components.training.checkpoints import INFO_FILE

logger = logging.getLogger(__name__)

SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"
_CHECKPOINT_PREFIX = "checkpoint_"


def _listed_checkpoints(snapshot: dict) -> set[str]:
    results = [*snapshot["checkpoint_results"], *snapshot.get("pending_training_results", [])]
    if snapshot.get("latest_checkpoint_result"):
        results.append(snapshot["latest_checkpoint_result"])
    return {result["checkpoint_dir_name"] for result in results}


def _run_folder(storage_path: str, run_name: str) -> tuple[pyarrow.fs.FileSystem, str]:
    filesystem, root = pyarrow.fs.FileSystem.from_uri(storage_path)
    return filesystem, f"{root.rstrip('/')}/{run_name}"


def _read_snapshot(filesystem: pyarrow.fs.FileSystem, folder: str) -> dict:
    with filesystem.open_input_stream(f"{folder}/{SNAPSHOT_FILE}") as stream:
        return json.loads(stream.read())


@dataclass(frozen=True)
class LatestCheckpoint:
    path: str  # as Ray's Checkpoint.path names it: a local folder, or bucket/prefix/... on S3
    info: dict  # its checkpoint.json: the job record, the epoch, whether it is the run's last


def latest_checkpoint_info(storage_path: str, run_name: str) -> LatestCheckpoint | None:
    """The checkpoint a run of storage_path/run_name resumes from, with its checkpoint.json; None when the
    run has none, or its files cannot be read (the workers, which load it, then decide alone)."""
    filesystem, folder = _run_folder(storage_path, run_name)
    try:
        latest = _read_snapshot(filesystem, folder).get("latest_checkpoint_result")
        if not latest:
            return None
        path = f"{folder}/{latest['checkpoint_dir_name']}"
        with filesystem.open_input_stream(f"{path}/{INFO_FILE}") as stream:
            info = json.loads(stream.read())
    except (OSError, ValueError, KeyError, TypeError) as error:  # FileNotFoundError is an OSError
        if not isinstance(error, FileNotFoundError):
            logger.info("cannot read the latest checkpoint of %s/%s before training (%s); the workers decide "
                        "whether to resume it", storage_path, run_name, error)
        return None
    return LatestCheckpoint(path, info)


def remove_unlisted_checkpoints(storage_path: str, run_name: str) -> list[str]:
    """Delete the `checkpoint_*` folders of storage_path/run_name that Ray's checkpoint list does
    not name; returns their names. storage_path: an absolute local folder or s3://bucket/prefix.

    Nothing is deleted unless the list exists and reads as expected: without it, Ray starts the
    run afresh and these folders are the only trace of the killed run, so they stay for a person
    to look at.
    """
    filesystem, folder = _run_folder(storage_path, run_name)
    try:
        listed = _listed_checkpoints(_read_snapshot(filesystem, folder))
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError) as error:
        logger.warning("left the checkpoints in %s/%s as they are: cannot read Ray's %s (%s)",
                       storage_path, run_name, SNAPSHOT_FILE, error)
        return []
    entries = filesystem.get_file_info(pyarrow.fs.FileSelector(folder, allow_not_found=True))
    removed = []
    for entry in entries:
        if (entry.type == pyarrow.fs.FileType.Directory and entry.base_name.startswith(_CHECKPOINT_PREFIX)
                and entry.base_name not in listed):
            filesystem.delete_dir(entry.path)
            removed.append(entry.base_name)
    return sorted(removed)
