"""exclusive_lock: one holder at a time, the second refused at once naming the first; a crashed holder never blocks."""

import os
import signal
import subprocess
import sys
import time

import boto3
import pytest

from components.locks import LockHeld, LockLost, exclusive_lock

HOLD = """
import sys, time
from components.locks import exclusive_lock
location, ttl = sys.argv[1], int(sys.argv[2])
with exclusive_lock(location, "test holder", ttl_s=ttl):
    print("holding", flush=True)
    time.sleep(600)
"""


def start_holder(location: str, ttl_s: int = 300) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLD, location, str(ttl_s)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    line = holder.stdout.readline()
    assert line.strip() == "holding", holder.stderr.read()
    return holder


def kill(holder: subprocess.Popen) -> None:
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()


def test_a_local_lock_refuses_a_second_process_and_dies_with_its_holder(tmp_path):
    target = tmp_path / "data/prepared"
    holder = start_holder(str(target))
    try:
        with pytest.raises(LockHeld) as refused:
            with exclusive_lock(target, "second"):
                pass
        assert f"pid {holder.pid} (test holder)" in str(refused.value) and str(target) in str(refused.value)
    finally:
        kill(holder)
    with exclusive_lock(target, "second") as lock:  # the kernel released the dead holder's lock
        lock.check()
        with pytest.raises(LockHeld, match=f"pid {os.getpid()} \\(second\\)"):
            with exclusive_lock(target, "third"):
                pass
    assert sorted(os.listdir(tmp_path / "data")) == []  # released: no lock file left behind


def test_an_s3_lock_refuses_a_second_process_and_expires_after_its_holder_crashed(s3_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket="locks")
    holder = start_holder("s3://locks/set", ttl_s=2)
    try:
        with pytest.raises(LockHeld) as refused:
            with exclusive_lock("s3://locks/set", "second", client=client):
                pass
        assert f"pid {holder.pid} (test holder)" in str(refused.value) and "s3://locks/set.lock" in str(refused.value)
        time.sleep(3)  # the heartbeat keeps a live holder's lock from expiring
        with pytest.raises(LockHeld):
            with exclusive_lock("s3://locks/set", "second", client=client):
                pass
    finally:
        kill(holder)
    deadline = time.monotonic() + 15
    while True:  # the crashed holder's lock object expires after its time to live
        try:
            with exclusive_lock("s3://locks/set", "second", client=client) as lock:
                lock.check()
                body = client.get_object(Bucket="locks", Key="set.lock")["Body"].read().decode()
                assert f"pid {os.getpid()}" in body and "second" in body
            break
        except LockHeld:
            assert time.monotonic() < deadline, "the expired lock was never taken over"
            time.sleep(0.5)
    assert "Contents" not in client.list_objects_v2(Bucket="locks")  # released: the lock object is gone


def test_an_s3_lock_taken_over_tells_its_holder(s3_endpoint):
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket="lost-locks")
    with exclusive_lock("s3://lost-locks/set", "slow holder", ttl_s=3, client=client) as lock:
        client.put_object(Bucket="lost-locks", Key="set.lock", Body=b'{"owner": "someone else"}')
        time.sleep(1.5)  # the next renewal finds the object replaced
        with pytest.raises(LockLost, match="replaced or removed by another process"):
            lock.check()
    # the new owner's object is left alone
    assert client.get_object(Bucket="lost-locks", Key="set.lock")["Body"].read() == b'{"owner": "someone else"}'


def test_a_lock_on_the_bucket_root_uses_a_named_object(s3_endpoint):
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket="root-locks")
    with exclusive_lock("s3://root-locks", "root", client=client):
        assert [o["Key"] for o in client.list_objects_v2(Bucket="root-locks")["Contents"]] == [".pairgan.lock"]
