"""A prepared data set in a local folder, made readable by Ray workers on other machines.

`dvc repro` trains on `data/prepared`, a folder on the driver's machine. Workers on other nodes
cannot read it, so before such a job the driver copies the data set under the job's shared
storage (`run.storage_path` on S3), in a folder named after the manifest's checksum: a data set
is copied once, every later job on it finds it there, and a grown data set gets a folder of its
own. The manifest is uploaded last, so a copy cut short is never taken for a data set; the
workers verify every shard against it as they do for any s3:// data.
"""

import logging
from pathlib import Path
from typing import Any

from tqdm import tqdm

from components.data.manifest import MANIFEST_NAME, Manifest, ManifestError, load_manifest
from components.object_store import join_s3_uri, s3_client, upload_file

log = logging.getLogger(__name__)

SHARED_DATA_FOLDER = "data"


def shared_location(storage_path: str, manifest: Manifest) -> str:
    """Where the data set goes under the job's shared storage (an s3:// prefix)."""
    return join_s3_uri(storage_path, f"{SHARED_DATA_FOLDER}/{manifest.checksum[:16]}")


def share_prepared(manifest: Manifest, destination: str, client: Any = None, progress: bool = True) -> bool:
    """Copy the local data set of `manifest` to `destination` (s3://) unless it is there already.

    Returns whether anything was uploaded. Raises ObjectStoreError.
    """
    client = client or s3_client()
    try:
        if load_manifest(destination, client).checksum == manifest.checksum:
            return False
    except ManifestError:
        pass  # not there yet (or a copy cut short, without its manifest): copy it
    folder = Path(manifest.location)
    files = [name for split in manifest.splits.values() for shard in split.shards for name in (shard.tar, shard.index)]
    log.info("copying the data set (%d files) to %s for the workers on other nodes", len(files), destination)
    for relative in tqdm(files, unit="file", desc="share data", disable=not progress):
        upload_file(client, folder / relative, join_s3_uri(destination, relative))
    upload_file(client, folder / MANIFEST_NAME, join_s3_uri(destination, MANIFEST_NAME))  # the commit point
    return True
