"""No S3 credential reaches prepare's output: refused in params, removed from the store's error messages."""

import socket
from pathlib import Path

import pytest

from components.config import with_overrides
from pipelines.cli import main
from support.params import write_shipped

SECRET = "SECRET-7f3a"


def write_data_params(folder: Path, **overrides) -> None:
    small = {"source": {"kind": "builtin", "path": None, "builtin": {"train_pairs": 4, "val_pairs": 1, "test_pairs": 1}},
             "image_size": 32}
    write_shipped(folder, "data", **with_overrides(small, overrides))


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def printed(capfd, caplog) -> str:
    captured = capfd.readouterr()
    return captured.out + captured.err + caplog.text


def written_text(folder: Path) -> str:
    return "".join(path.read_text(errors="replace") for path in folder.rglob("*") if path.is_file())


@pytest.mark.parametrize(("key", "source"), [
    ("source.s3.endpoint_url", {"kind": "pix2pix", "path": "s3://pairs/set",
                                "s3": {"endpoint_url": f"http://user:{SECRET}@127.0.0.1:9000"}}),
    ("source.path", {"kind": "pix2pix", "path": f"s3://user:{SECRET}@pairs/set"}),
])
def test_credentials_in_params_are_refused_without_being_repeated(tmp_path, monkeypatch, capfd, caplog, key, source):
    monkeypatch.chdir(tmp_path)
    write_data_params(tmp_path / "params", source=source)
    assert main(["prepare", "--out", "data/prepared", "--report", "reports/prepare.json", "--no-progress"]) == 2
    output = printed(capfd, caplog)
    assert f"params/data.yaml: {key}: holds a user name or password" in output
    assert "credentials come from boto3's standard chain" in output
    assert SECRET not in output
    assert not (tmp_path / "data").exists() and not (tmp_path / "reports").exists()


def test_an_endpoint_with_credentials_in_the_environment_is_not_printed(tmp_path, monkeypatch, capfd, caplog,
                                                                       s3_endpoint):
    monkeypatch.chdir(tmp_path)
    write_data_params(tmp_path / "params")
    port = closed_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://user:{SECRET}@127.0.0.1:{port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    assert main(["prepare", "--out", "s3://pairs/set", "--report", "reports/prepare.json", "--no-progress"]) == 1
    output = printed(capfd, caplog)
    assert f"http://127.0.0.1:{port}" in output  # the error still says where it tried
    assert SECRET not in output and SECRET not in written_text(tmp_path)
