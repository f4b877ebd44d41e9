"""Fixtures: every database-backed test runs on SQLite and on the real PostgreSQL."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import (
    Server,
    hold_port,
    make_settings,
    postgres_database,
    running_server,
    tmp_sqlite_url,
)


@pytest.fixture(params=["sqlite", "postgresql"])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh database: a SQLite file, or a new PostgreSQL database."""
    if request.param == "sqlite":
        yield tmp_sqlite_url(tmp_path)
    else:
        async with postgres_database() as url:
            yield url


@pytest.fixture
async def server(database_url: str) -> AsyncIterator[Server]:
    """A real taskd server on a port-0 socket over a fresh database."""
    async with running_server(make_settings(database_url)) as running:
        yield running


@pytest.fixture
def held_ports() -> Iterator[Callable[[], int]]:
    """Hold a new local port per call for the test (see ``hold_port``)."""
    with contextlib.ExitStack() as stack:
        yield lambda: stack.enter_context(hold_port())


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A fresh self-signed certificate for 127.0.0.1 and its key, made by openssl."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            *(openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key
