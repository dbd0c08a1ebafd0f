"""A local data set copied under the job's S3 storage for workers on other nodes: once per data set,
the manifest last, a copy cut short completed by the next job."""

import boto3
import pytest

from components.data.manifest import load_manifest
from components.object_store import join_s3_uri
from components.training.shared_data import share_prepared, shared_location


@pytest.fixture
def client(s3_endpoint):
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket="jobs")
    return client


def count_writes(client) -> list[str]:
    writes: list[str] = []
    for operation in ("PutObject", "CreateMultipartUpload"):
        client.meta.events.register(f"provide-client-params.s3.{operation}", lambda params, **_: writes.append(params["Key"]))
    return writes


def test_shared_once_per_data_set_with_the_same_bytes(prepared_builtin, client):
    manifest = load_manifest(prepared_builtin)
    destination = shared_location("s3://jobs/checkpoints", manifest)
    assert destination == f"s3://jobs/checkpoints/data/{manifest.checksum[:16]}"
    writes = count_writes(client)

    assert share_prepared(manifest, destination, client, progress=False) is True
    copy = load_manifest(destination, client)
    assert copy.checksum == manifest.checksum
    for split in manifest.splits.values():
        for shard in split.shards:
            body = client.get_object(Bucket="jobs", Key=join_s3_uri(destination, shard.tar).split("/", 3)[3])["Body"]
            assert body.read() == (prepared_builtin / shard.tar).read_bytes()
    assert writes[-1].endswith("/manifest.json")  # the manifest last: a copy cut short is no data set

    written = len(writes)
    assert share_prepared(manifest, destination, client, progress=False) is False
    assert len(writes) == written  # the next job on the same data set copies nothing


def test_a_copy_cut_short_is_completed(prepared_builtin, client):
    manifest = load_manifest(prepared_builtin)
    destination = shared_location("s3://jobs/cut", manifest)
    share_prepared(manifest, destination, client, progress=False)
    client.delete_object(Bucket="jobs", Key=f"cut/data/{manifest.checksum[:16]}/manifest.json")

    assert share_prepared(manifest, destination, client, progress=False) is True
    assert load_manifest(destination, client).checksum == manifest.checksum
