"""Fixtures shared across the suite: a real S3-compatible server on loopback, a real Prefect API, a local
Ray with declared GPUs, example assets and the paced generator's inputs."""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

# No telemetry from the Prefect servers the tests start (the network is closed anyway).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "manifests" / "examples"
EXAMPLE_BUCKET = "s2v-examples"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto in server mode on 127.0.0.1 (as s3fs's own tests do); clients reach it over HTTP."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID",
                                           "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    # botocore (and so s3fs) reads the endpoint from AWS_ENDPOINT_URL_S3, as it would for MinIO.
    os.environ.update({
        "AWS_ENDPOINT_URL_S3": endpoint, "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
    })
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3(s3_endpoint: str):
    """A fresh s3fs client against the loopback server, with the example bucket uploaded."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(anon=False)
    if not fs.exists(EXAMPLE_BUCKET):
        fs.mkdir(EXAMPLE_BUCKET)
        fs.put(str(EXAMPLES / "media"), f"{EXAMPLE_BUCKET}/media", recursive=True)
        fs.put_file(str(EXAMPLES / "batch-s3.csv"), f"{EXAMPLE_BUCKET}/batch.csv")
    fs.invalidate_cache()
    return fs


@pytest.fixture(scope="module")
def prefect_api() -> Iterator[str]:
    """A real Prefect API for a module: a temporary server on a throwaway SQLite database; yields its URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """One local Ray for a module, as the pool starts one: 4 declared GPUs on this CPU machine, small object store."""
    import ray

    from tasks.generate.pool_config import init_ray

    init_ray(cpus=4, gpus=4)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    """Image and speech for the paced generator's jobs (tests/paced.py)."""
    from paced import write_inputs

    return write_inputs(tmp_path_factory.mktemp("inputs"))


@pytest.fixture
def examples(tmp_path: Path) -> Path:
    """A private copy of the example manifest and media (tests may add or break files)."""
    dest = tmp_path / "examples"
    shutil.copytree(EXAMPLES, dest)
    return dest
