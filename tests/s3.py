"""A real local S3 server for tests and benchmarks: moto's server mode in a subprocess.

It listens on 127.0.0.1 on a free port and serves one bucket. Clients reach it the way
they would reach any S3-compatible endpoint: ``AWS_ENDPOINT_URL`` and the usual
credential variables (``env``), or fsspec storage options (``storage_options``).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

#: dummy credentials: moto accepts any
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """``with S3Server() as s3:`` a running server with bucket ``s3.bucket``."""

    def __init__(self, bucket: str = "etf-test") -> None:
        self.bucket = bucket
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen | None = None
        self._saved: dict[str, str | None] = {}

    @property
    def env(self) -> dict[str, str]:
        """What a client process needs in its environment to use this server."""
        return {**CREDENTIALS, "AWS_ENDPOINT_URL": self.endpoint}

    @property
    def storage_options(self) -> dict[str, object]:
        return {"key": "testing", "secret": "testing", "endpoint_url": self.endpoint}

    def url(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *parts])

    def __enter__(self) -> S3Server:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1).close()
                break
            except OSError:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    self.__exit__()
                    raise RuntimeError("the moto S3 server did not start") from None
                time.sleep(0.2)
        for k, v in self.env.items():  # this process's own clients (s3fs, obstore) find it as any other would
            self._saved[k] = os.environ.get(k)
            os.environ[k] = v
        import s3fs

        s3fs.S3FileSystem(**self.storage_options).mkdir(self.bucket)
        return self

    def __exit__(self, *exc: object) -> None:
        for k, v in self._saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
