"""Settings for the test suite: the production topology, PostgreSQL and Redis.

Only the environment differs from a deployment; the settings module is the same. The
URLs come from ENCLAVE_TEST_DATABASE_URL and ENCLAVE_TEST_REDIS_URL so that a shell's
DATABASE_URL (say, the embedded SQLite) can never make the suite run on SQLite silently.
"""

import os
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

TEST_DATABASE_URL = os.environ.get(
    "ENCLAVE_TEST_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/enclave"
)
# db 11 is the suite's own Redis database; it is flushed at the start of a run.
TEST_REDIS_URL = os.environ.get("ENCLAVE_TEST_REDIS_URL", "redis://127.0.0.1:6379/11")
# Several suites may run at once on one machine (developers, CI): each run gets its own
# test database, its own broker key prefix and its own cache prefix, so none can drop,
# drain or reset another's.
RUN_ID = f"{os.getpid()}"
os.environ["ENCLAVE_BROKER_KEY_PREFIX"] = f"enclave-test-{RUN_ID}:"
os.environ["DATABASE_URL"] = TEST_DATABASE_URL
os.environ["CELERY_BROKER_URL"] = TEST_REDIS_URL
os.environ["CACHE_URL"] = TEST_REDIS_URL.rsplit("/", 1)[0] + "/12"
# Each run's own data directory (vault files, keys, logs), removed when the run ends.
os.environ["ENCLAVE_VAR_DIR"] = str(
    Path(os.environ.get("ENCLAVE_TEST_VAR_DIR", Path(__file__).resolve().parents[1] / "var"))
    / f"test-run-{RUN_ID}"
)

# Base models for the suite: a tiny random model the `base_model` fixture writes here.
os.environ["ENCLAVE_MODELS_DIR"] = str(Path(os.environ["ENCLAVE_VAR_DIR"]) / "models")

from controlplane.settings import *  # noqa: E402,F403
from controlplane.settings import CELERY_BROKER_URL, DATABASES  # noqa: E402

DATABASES["default"]["TEST"] = {"NAME": f"test_enclave_{RUN_ID}"}
CACHES["default"]["KEY_PREFIX"] = f"enclave-test-{RUN_ID}"  # noqa: F405

if DATABASES["default"]["ENGINE"] != "django.db.backends.postgresql":
    raise ImproperlyConfigured(f"the test suite runs on PostgreSQL, not {TEST_DATABASE_URL}")
if not CELERY_BROKER_URL.startswith("redis://"):
    raise ImproperlyConfigured(f"the test suite runs on Redis, not {CELERY_BROKER_URL}")
