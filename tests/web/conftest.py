"""Browser fixtures: the app served by a real uvicorn in a thread, driven by headless Chromium.

The browser tests run on the SQLite database of the test run (the embedded default); the
invariants on PostgreSQL are covered by the service and API tests.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvicorn
from playwright.sync_api import Browser, BrowserContext, Page, Playwright, sync_playwright

from app.core.config import Settings
from app.core.db import make_sessionmaker
from app.core.migrate import upgrade_database
from app.main import create_app
from tests.conftest import Factory, empty_all_tables, engine_for
from tests.tiny_models import save_tiny_model
from tests.workers.conftest import CeleryProcess, wait_for

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LiveServer:
    url: str
    database_url: str
    var_dir: Path


@pytest.fixture(scope="session")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    # Its own database, not the session's `sqlite_url`: the browser tests' worker (`live_worker`)
    # writes its presence there for the rest of the session, and a test of another file that the
    # same process runs later would see a worker that is not its own (`/readyz` answers 200).
    sqlite_url = f"sqlite:///{tmp_path_factory.mktemp('live-db') / 'verdict.db'}"
    upgrade_database(Settings(database_url=sqlite_url))
    var_dir = tmp_path_factory.mktemp("live-var")
    settings = Settings(
        database_url=sqlite_url, var_dir=var_dir, secret_key="browser-test-secret-" + "x" * 32
    )
    app = create_app(settings)
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("the live server did not start")
        time.sleep(0.05)
    yield LiveServer(url=f"http://127.0.0.1:{port}", database_url=sqlite_url, var_dir=var_dir)
    server.should_exit = True
    thread.join(timeout=10)
    app.state.engine.dispose()


@pytest.fixture(scope="session")
def playwright_instance() -> Iterator[Playwright]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium", pytrace=False)
    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="session")
def browser(playwright_instance: Playwright) -> Iterator[Browser]:
    b = playwright_instance.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    yield b
    b.close()


@pytest.fixture
def context(browser: Browser, live_server: LiveServer) -> Iterator[BrowserContext]:
    ctx = browser.new_context(base_url=live_server.url, viewport={"width": 1400, "height": 1000})
    ctx.set_default_timeout(10_000)
    yield ctx
    ctx.close()


@pytest.fixture
def page(context: BrowserContext) -> Page:
    return context.new_page()


@pytest.fixture
def web_factory(live_server: LiveServer) -> Iterator[Factory]:
    """Rows in the live server's database, emptied after each test."""
    session = make_sessionmaker(engine_for(live_server.database_url))()
    yield Factory(session)
    session.close()
    empty_all_tables(live_server.database_url)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random causal LM (set it as a project's `base_policy`)."""
    return save_tiny_model(tmp_path_factory.mktemp("web-tiny") / "model")


@pytest.fixture(scope="session")
def live_worker(live_server: LiveServer) -> Iterator[CeleryProcess]:
    """A real worker for the live server (`verdict worker --sole`, both queues, the embedded
    broker on SQLite), for pages that launch and follow runs."""
    env = {
        **os.environ,
        "VERDICT_DATABASE_URL": live_server.database_url,
        "VERDICT_VAR_DIR": str(live_server.var_dir),
        "VERDICT_WORKER_HEARTBEAT_TIMEOUT_S": "5",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    worker = CeleryProcess.verdict(
        ["worker", "-Q", "gpu,default", "--sole", "--name", "web@%h"],
        env,
        live_server.var_dir / "worker.log",
    )
    wait_for(
        lambda: " ready." in worker.output() or not worker.alive(),
        90,
        "the browser tests' worker to be ready",
        interval=0.2,
    )
    assert worker.alive(), worker.output()[-3000:]
    yield worker
    worker.stop()
