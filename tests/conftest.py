"""Fixtures shared by the whole suite: real services, real processes.

PostgreSQL and Redis must be running; the session stops at once, saying how to start
them, when either is unreachable. Worker and web fixtures start the same commands an
operator runs (controlplane.launch), pointed at the test database.
"""

import os
import shutil
import time
import uuid

import psycopg
import pytest
import redis

from tests import settings as test_settings

START_POSTGRES = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"
START_REDIS = "redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save '' --appendonly no"


def _check_services() -> None:
    from django.conf import settings

    db = settings.DATABASES["default"]
    try:
        psycopg.connect(
            host=db["HOST"],
            port=db["PORT"] or 5432,
            user=db["USER"],
            password=db["PASSWORD"] or None,
            dbname="postgres",
            connect_timeout=3,
        ).close()
    except psycopg.OperationalError as exc:
        pytest.exit(
            f"PostgreSQL is not reachable at {db['HOST']}:{db['PORT']} ({exc}).\n"
            f"Start it with: {START_POSTGRES}\n"
            f"or point ENCLAVE_TEST_DATABASE_URL at a running server.",
            returncode=3,
        )
    try:
        client = redis.Redis.from_url(test_settings.TEST_REDIS_URL, socket_timeout=2)
        client.ping()
    except redis.RedisError as exc:
        pytest.exit(
            f"Redis is not reachable at {test_settings.TEST_REDIS_URL} ({exc}).\n"
            f"Start it with: {START_REDIS}\n"
            f"or point ENCLAVE_TEST_REDIS_URL at a running server.",
            returncode=3,
        )


def pytest_sessionstart(session):
    _check_services()


def pytest_sessionfinish(session, exitstatus):
    """Drop this run's data directory, broker and cache keys (each run has its own)."""
    from django.conf import settings

    shutil.rmtree(settings.VAR_DIR, ignore_errors=True)
    try:
        for url, pattern in (
            (test_settings.TEST_REDIS_URL, f"enclave-test-{test_settings.RUN_ID}:*"),
            (os.environ["CACHE_URL"], f"*enclave-test-{test_settings.RUN_ID}*"),
        ):
            client = redis.Redis.from_url(url, socket_timeout=2)
            for key in client.scan_iter(match=pattern, count=500):
                client.delete(key)
    except redis.RedisError:
        pass  # the session already failed on an unreachable Redis


#: The role child processes connect as: no superuser, no BYPASSRLS, owns no table, so the
#: row-level security policies apply to them as in production (controlplane.rls).
APP_ROLE = "enclave_app"


def _database_url(user: str, password: str = "") -> str:
    from django.conf import settings

    db = settings.DATABASES["default"]
    auth = f"{user}:{password}" if password else user
    return f"postgres://{auth}@{db['HOST']}:{db['PORT'] or 5432}/{db['NAME']}"


@pytest.fixture(scope="session")
def test_database_owner_url(django_db_setup) -> str:
    """The database pytest-django created, as its owner (the role migrations ran as)."""
    from django.conf import settings

    db = settings.DATABASES["default"]
    return _database_url(db["USER"], db["PASSWORD"] or "")


@pytest.fixture(scope="session")
def test_database_url(test_database_owner_url, django_db_blocker) -> str:
    """The same database as the application's role, for child processes (web, workers)."""
    from django.conf import settings

    from controlplane.rls.roles import app_role_ensure

    password = settings.DATABASES["default"]["PASSWORD"] or ""
    with django_db_blocker.unblock():
        app_role_ensure(role=APP_ROLE, password=password or None)
    return _database_url(APP_ROLE, password)


@pytest.fixture(scope="session")
def process_env(test_database_url):
    """What a child process needs to share the suite's database and broker."""
    from controlplane import launch

    return launch.process_env(
        {
            "DATABASE_URL": test_database_url,
            "CELERY_BROKER_URL": test_settings.TEST_REDIS_URL,
            "DJANGO_SETTINGS_MODULE": "controlplane.settings",
            # Short leases and a fast reaper, so durability tests run in seconds.
            "ENCLAVE_JOB_LEASE_SECONDS": "3",
            "ENCLAVE_REAPER_INTERVAL_SECONDS": "1",
        }
    )


@pytest.fixture
def start_worker(process_env, tmp_path):
    """Start real `celery worker` processes; each is stopped (group killed) at teardown."""
    from controlplane import launch

    started = []

    def start(queues: str = "default,train") -> launch.ManagedProcess:
        name = f"test-{uuid.uuid4().hex[:6]}"
        worker = launch.ManagedProcess(
            name,
            launch.worker_command(queues=queues, name=name),
            log_path=tmp_path / f"{name}.log",
            env=process_env,
        )
        started.append(worker)
        worker.wait_for_log("ready.", timeout=60)
        return worker

    yield start
    for worker in started:
        worker.stop()
        # Shown by pytest only when the test failed: what the worker was doing.
        print(f"---- {worker.name} log (tail) ----\n{worker.log_text()[-4000:]}")


@pytest.fixture
def celery_worker(start_worker):
    """One real worker process on both queues."""
    return start_worker()


def wait_for(predicate, timeout: float, interval: float = 0.1, what: str = "condition"):
    """Poll `predicate` until it returns something truthy; AssertionError on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


BASE_MODEL = "enclave-test"


@pytest.fixture(scope="session")
def base_model():
    """A tiny random DeepSeek-V3 model with a tokenizer, installed as base model
    `enclave-test` under ENCLAVE_MODELS_DIR (shared with every child process)."""
    from django.conf import settings

    from tests.inference.test_engine import make_model_dir

    path = settings.ENCLAVE_MODELS_DIR / BASE_MODEL
    if not (path / "config.json").exists():
        path.mkdir(parents=True, exist_ok=True)
        make_model_dir(path, {"max_position_embeddings": 1024})  # room for the suites' prompts
    return BASE_MODEL


@pytest.fixture(scope="session")
def web_server(process_env, tmp_path_factory):
    """A real uvicorn process serving the platform on a free port, on the test database."""
    from controlplane import launch

    port = launch.free_port()
    env = {**process_env, "ENCLAVE_FILE_MAX_BYTES": str(1024 * 1024)}
    web = launch.ManagedProcess(
        "web",
        launch.web_command(port=port),
        log_path=tmp_path_factory.mktemp("web") / "web.log",
        env=env,
    )
    web.url = f"http://127.0.0.1:{port}"
    try:
        launch.wait_until_ready(web.url, timeout=60, process=web)
        yield web
    finally:
        web.stop()


@pytest.fixture(scope="session")
def live_server_url(web_server) -> str:
    return web_server.url


@pytest.fixture
def make_tenant(db):
    """Create a tenant with an API key of the given role; returns (tenant, raw key)."""
    from controlplane.tenancy import services

    def make(slug: str, role: str = "admin", vertical: str = "other"):
        tenant = services.tenant_create(slug=slug, name=slug.title(), vertical=vertical)
        _key, raw = services.api_key_create(tenant=tenant, role=role)
        return tenant, raw

    return make
