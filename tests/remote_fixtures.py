"""Fixtures for real object-storage servers on 127.0.0.1: moto (S3) and gcp-storage-emulator (GCS)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import uuid

import pytest

os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # before gcsfs is imported

HERE = os.path.dirname(os.path.abspath(__file__))


def gate_uploads(monkeypatch) -> tuple[threading.Event, threading.Event]:
    """Hold every upload until ``gate`` is set; ``started`` is set once one is under way (no sleeps: a test
    waits on ``started``, saves while uploads are held, then sets ``gate``)."""
    from ckptio.storage import Storage

    gate, started = threading.Event(), threading.Event()
    real = Storage.put_file

    def gated(self, local_path, name, **kw):
        started.set()
        assert gate.wait(timeout=60)
        return real(self, local_path, name, **kw)

    monkeypatch.setattr(Storage, "put_file", gated)
    return gate, started


class S3Server:
    def __init__(self, log_path: str):
        self.log_path = log_path
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "s3_server.py"), "--port", str(self.port), "--log", self.log_path],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True,
        )  # fmt: skip
        line = self.proc.stdout.readline()  # blocks until the server listens (or died)
        if not line.startswith("PORT "):
            self.proc.kill()
            raise RuntimeError(f"S3 server did not start: {line!r}")
        self.port = int(line.split()[1])

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def options(self) -> dict:
        """s3fs options: fail fast on a dead server (ckptio's own retries and time bounds take over)."""
        return {
            "key": "testing", "secret": "testing", "skip_instance_cache": True,
            "client_kwargs": {"endpoint_url": self.endpoint},
            "config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"}, "connect_timeout": 1, "read_timeout": 3},
        }  # fmt: skip

    def make_bucket(self) -> str:
        import s3fs

        name = f"b{uuid.uuid4().hex[:10]}"
        s3fs.S3FileSystem(**self.options()).mkdir(name)
        return name

    def requests(self) -> list[str]:
        with open(self.log_path) as f:
            return f.read().splitlines()

    def freeze(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(timeout=30)


@contextlib.contextmanager
def running_s3(log_path: str):
    server = S3Server(log_path)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3(tmp_path):
    with running_s3(str(tmp_path / "s3-requests.log")) as server:
        yield server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GCSServer:
    def __init__(self):
        from gcp_storage_emulator.server import create_server

        for name in ("gcp_storage_emulator", "werkzeug"):
            logging.getLogger(name).setLevel(logging.ERROR)
        self.port = free_port()
        self.server = create_server("127.0.0.1", self.port, in_memory=True)
        self.server.start()

    def options(self) -> dict:
        return {
            "endpoint_url": f"http://127.0.0.1:{self.port}",
            "token": "anon",
            "project": "test",
            "skip_instance_cache": True,
        }

    def make_bucket(self) -> str:
        import gcsfs

        name = f"b{uuid.uuid4().hex[:10]}"
        gcsfs.GCSFileSystem(**self.options()).mkdir(name)
        return name

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture(scope="module")
def gcs():
    server = GCSServer()
    try:
        yield server
    finally:
        server.stop()


class EventOnLog(logging.Handler):
    """Sets an event when ckptio logs a message containing ``needle`` (from any thread)."""

    def __init__(self, needle: str):
        super().__init__()
        self.needle = needle
        self.event = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.needle in record.getMessage():
            self.event.set()
