"""Real server processes for end-to-end tests: daphne serving Keyway, and llama.cpp's own OpenAI server."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2

from platform_site import serve

BASE_DIR = Path(__file__).resolve().parents[2]
PYTHON = sys.executable


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(url: str, *, process: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args} exited with {process.returncode}")
        try:
            if httpx2.get(url, timeout=1.0).status_code < 500:
                return
        except httpx2.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not come up in {timeout} s")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# A migrated database made once per test session and copied for each stack: a copy takes half a second where
# migrating takes ~15 (measured: 14.5 s on PostgreSQL, 12 of them CPU). A PostgreSQL database name, or an SQLite
# file.
_template: str | None = None


def _migrated_template() -> str:
    global _template
    if _template is not None:
        return _template
    import atexit
    import tempfile

    var_dir = Path(tempfile.mkdtemp(prefix="keyway-e2e-template-"))
    env = dict(os.environ, DEBUG="1", KEYWAY_VAR_DIR=str(var_dir), PYTHONUNBUFFERED="1")
    database_url = os.environ.get("DATABASE_URL", "")
    if database_url.startswith("postgres"):
        import psycopg

        name = f"keyway_e2e_template_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(database_url.rsplit("/", 1)[0] + "/postgres", autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        atexit.register(drop_database, name)
        env["DATABASE_URL"] = database_url.rsplit("/", 1)[0] + f"/{name}"
        manage(env, "migrate", "--no-input", "-v", "0")
        _template = name
    else:
        manage(env, "migrate", "--no-input", "-v", "0")
        _template = str(var_dir / "keyway.sqlite3")
    return _template


def make_environment(var_dir: Path) -> tuple[dict[str, str], str | None]:
    """Environment for server and CLI processes: their own var dir and a migrated database of their own.
    Returns (env, pg_db_name)."""
    import shutil

    template = _migrated_template()
    env = dict(os.environ)
    env.update(
        DEBUG="1",
        KEYWAY_VAR_DIR=str(var_dir),
        KEYWAY_MODEL_DIR=str(BASE_DIR / "var" / "models"),
        KEYWAY_LLAMA_THREADS="2",
        PYTHONUNBUFFERED="1",
    )
    database_name = None
    database_url = os.environ.get("DATABASE_URL", "")
    if database_url.startswith("postgres"):
        import psycopg

        database_name = f"keyway_e2e_{uuid.uuid4().hex[:10]}"
        admin_url = database_url.rsplit("/", 1)[0] + "/postgres"
        with psycopg.connect(admin_url, autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{database_name}" TEMPLATE "{template}"')
        env["DATABASE_URL"] = database_url.rsplit("/", 1)[0] + f"/{database_name}"
    else:
        var_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(template, var_dir / "keyway.sqlite3")
    if os.environ.get("REDIS_URL"):
        # A prefix of its own, so a test run never reads another run's cached keys.
        env["KEYWAY_CACHE_PREFIX"] = f"e2e-{uuid.uuid4().hex[:8]}"
    return env, database_name


def drop_database(name: str | None) -> None:
    if name is None:
        return
    import psycopg

    admin_url = os.environ["DATABASE_URL"].rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin_url, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def manage(env: dict[str, str], *args: str) -> str:
    result = subprocess.run(
        [PYTHON, "manage.py", *args], cwd=BASE_DIR, env=env, capture_output=True, text=True, timeout=300
    )
    if result.returncode != 0:
        raise RuntimeError(f"manage.py {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout


# Every Keyway server's log and var directory this session, for the check that no secret or prompt text is
# ever logged (tests/e2e/conftest.py).
SERVER_LOGS: list[tuple[Path, Path]] = []


def start_keyway(
    env: dict[str, str], log: Path, *, uvicorn: bool = False, workers: int = 1
) -> tuple[subprocess.Popen[bytes], str]:
    """A Keyway server process: daphne (as `make run` serves), or uvicorn (as production may, with several
    worker processes)."""
    SERVER_LOGS.append((log, Path(env["KEYWAY_VAR_DIR"])))
    port = free_port()
    handle = log.open("ab")
    if uvicorn:
        command = [PYTHON, "-m", "uvicorn", "--host", "127.0.0.1", "--port", str(port), "--no-access-log",
                   "--workers", str(workers), "platform_site.asgi:application"]
    else:
        command = serve.command(port, quiet=False)
    process = subprocess.Popen(command, cwd=BASE_DIR, env=env, stdout=handle, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_for(f"{url}/health", process=process)
    return process, url


def start_fake_upstream(log: Path, *, host: str = "127.0.0.1") -> tuple[subprocess.Popen[bytes], str]:
    """bench/fake_upstream.py as its own process (so it can be killed like a real upstream)."""
    port = free_port()
    process = subprocess.Popen(
        [PYTHON, "bench/fake_upstream.py", "--port", str(port), "--host", host], cwd=BASE_DIR,
        stdout=log.open("ab"), stderr=subprocess.STDOUT,
    )
    url = f"http://{host}:{port}"
    wait_for(f"{url}/v1/models", process=process)
    return process, url


def django_shell(env: dict[str, str], code: str) -> str:
    """Run Python inside a Django process of the stack (its database, its settings); returns stdout."""
    return manage(env, "shell", "-c", code)


def start_llama_server(model_path: Path, log: Path, alias: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    handle = log.open("ab")
    process = subprocess.Popen(
        [PYTHON, "-m", "llama_cpp.server", "--model", str(model_path), "--model_alias", alias,
         "--chat_format", "gemma", "--host", "127.0.0.1", "--port", str(port), "--n_threads", "1",
         "--n_ctx", "2048"],
        cwd=BASE_DIR, stdout=handle, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    wait_for(f"{url}/v1/models", process=process, timeout=120)
    return process, url


STAFF_SESSION = """
from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY, get_user_model
from django.contrib.sessions.backends.db import SessionStore
user, _ = get_user_model().objects.get_or_create(username="ops", defaults={"email": "ops@example.com"})
user.is_staff = True
user.set_unusable_password()
user.save()
session = SessionStore()
session[SESSION_KEY] = str(user.pk)
session[BACKEND_SESSION_KEY] = "django.contrib.auth.backends.ModelBackend"
session[HASH_SESSION_KEY] = user.get_session_auth_hash()
session.create()
print(session.session_key)
"""


def staff_cookies(env: dict[str, str]) -> dict[str, str]:
    """A signed-in staff user's session cookie (for /status's figures), made in the stack's database."""
    return {"sessionid": django_shell(env, STAFF_SESSION).strip().splitlines()[-1]}


@contextlib.contextmanager
def keyway_stack(
    var_dir: Path, *, upstream_models: str, workers: int = 1, env_extra: dict[str, str] | None = None
) -> Iterator[dict[str, Any]]:
    """The usual end-to-end stack: the fake upstream (serving `upstream_models`), a migrated and bootstrapped
    Keyway on uvicorn with `workers` processes, and a demo key. Yields its url, key, env and process; stops
    it all and drops its database afterwards."""
    env, database = make_environment(var_dir)
    env.update(env_extra or {})
    process = upstream = None
    try:
        upstream, upstream_url = start_fake_upstream(var_dir / "upstream.log")
        env.update(KEYWAY_UPSTREAM_BASE_URL=f"{upstream_url}/v1", KEYWAY_UPSTREAM_MODELS=upstream_models,
                   KEYWAY_UPSTREAM_NAME="fake")
        if "DATABASE_URL" in (env_extra or {}):
            manage(env, "migrate", "--no-input", "-v", "0")  # a database of the test's own, not the template's copy
        manage(env, "bootstrap")
        key = manage(env, "createapikey", "demo", "--name", "e2e").strip()
        process, url = start_keyway(env, var_dir / "server.log", uvicorn=True, workers=workers)
        yield {"url": url, "key": key, "env": env, "process": process}
    finally:
        for running in (process, upstream):
            if running is not None:
                stop(running)
        drop_database(database)
