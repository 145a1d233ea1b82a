"""The house itself: import paths, settings from the environment, CI's failure modes."""

import ast
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ENGINE_PACKAGES = ("inference", "finetune", "federated")
FORBIDDEN = ("django", "controlplane", "rest_framework", "celery")


def _clean_env(**overrides) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DATABASE_URL", "CELERY_", "ENCLAVE_", "DJANGO_"))
    }
    env.update(overrides)
    return env


def test_stdlib_platform_module_is_not_shadowed_in_this_django_process():
    import platform

    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    assert Path(platform.__file__).resolve().parent == stdlib
    assert platform.system() == os.uname().sysname


def test_stdlib_platform_module_works_inside_manage_py(tmp_path):
    code = "import platform, controlplane; print(platform.system(), platform.__file__)"
    out = (
        subprocess.run(
            [sys.executable, "manage.py", "shell", "-c", code],
            cwd=REPO,
            env=_clean_env(ENCLAVE_VAR_DIR=str(tmp_path)),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        .stdout.splitlines()[-1]
        .split()
    )
    assert out[0] == os.uname().sysname
    assert Path(out[1]).parent.resolve() == Path(sysconfig.get_paths()["stdlib"]).resolve()


def test_installed_distribution_imports_controlplane_without_manage_py(tmp_path):
    """The editable install maps platform/controlplane to a top-level package."""
    out = subprocess.run(
        [sys.executable, "-c", "import controlplane, platform; print(controlplane.__file__)"],
        cwd=tmp_path,  # not the repo: only the installed distribution can find it
        env=_clean_env(ENCLAVE_VAR_DIR=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.strip()
    assert Path(out).resolve() == REPO / "platform" / "controlplane" / "__init__.py"


def test_platform_folder_is_not_a_package():
    assert not (REPO / "platform" / "__init__.py").exists()


def test_engine_packages_never_import_the_control_plane():
    offenders = []
    for package in ENGINE_PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module]
                offenders += [
                    f"{path.relative_to(REPO)}:{node.lineno} imports {n}"
                    for n in names
                    if n.split(".")[0] in FORBIDDEN
                ]
    assert offenders == []


def test_settings_default_to_embedded_sqlite_and_filesystem_broker(tmp_path):
    code = (
        "from django.conf import settings as s; "
        "print(s.DATABASES['default']['ENGINE'], s.DATABASES['default']['NAME'], "
        "s.CELERY_BROKER_URL)"
    )
    out = (
        subprocess.run(
            [sys.executable, "manage.py", "shell", "-c", code],
            cwd=REPO,
            env=_clean_env(ENCLAVE_VAR_DIR=str(tmp_path)),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        .stdout.splitlines()[-1]
        .split()
    )
    assert out[0] == "django.db.backends.sqlite3"
    assert Path(out[1]).parent == tmp_path
    assert out[2].startswith("filesystem://")
    assert (tmp_path / "broker" / "queue").is_dir()


def test_settings_come_from_the_environment(tmp_path):
    code = (
        "from django.conf import settings as s; d = s.DATABASES['default']; "
        "print(d['ENGINE'], d['HOST'], d['NAME'], s.CELERY_BROKER_URL)"
    )
    out = (
        subprocess.run(
            [sys.executable, "manage.py", "shell", "-c", code],
            cwd=REPO,
            env=_clean_env(
                ENCLAVE_VAR_DIR=str(tmp_path),
                DATABASE_URL="postgres://someone@db.example:5432/enclave",
                CELERY_BROKER_URL="redis://cache.example:6379/3",
            ),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        .stdout.splitlines()[-1]
        .split()
    )
    assert out == [
        "django.db.backends.postgresql",
        "db.example",
        "enclave",
        "redis://cache.example:6379/3",
    ]


def test_suite_runs_on_postgresql_and_redis():
    from django.conf import settings
    from django.db import connection

    assert connection.vendor == "postgresql"
    assert settings.CELERY_BROKER_URL.startswith("redis://")


def test_pytest_collecting_no_tests_fails(tmp_path):
    """CI must go red when nothing is collected: pytest exits 5, and .ci/run passes it on."""
    (tmp_path / "test_nothing.py").write_text("x = 1\n")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:django", "-q", str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 5
    ci = (REPO / ".ci" / "run").read_text()
    assert "set -euo pipefail" in ci and "make test" in ci


def test_unreachable_services_stop_the_suite_with_instructions(tmp_path):
    (tmp_path / "test_x.py").write_text("def test_x():\n    assert True\n")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", str(tmp_path)],
        cwd=REPO,
        env={**os.environ, "ENCLAVE_TEST_REDIS_URL": "redis://127.0.0.1:1/11"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 3, result.stdout + result.stderr
    assert "Redis is not reachable" in result.stdout + result.stderr
    assert "redis-server" in result.stdout + result.stderr


def test_openapi_schema_generates_without_warnings_and_validates(tmp_path):
    result = subprocess.run(
        [sys.executable, "manage.py", "spectacular", "--fail-on-warn", "--validate",
         "--format", "openapi-json", "--file", str(tmp_path / "schema.json")],
        cwd=REPO, env=_clean_env(ENCLAVE_VAR_DIR=str(tmp_path)),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    import json

    paths = json.loads((tmp_path / "schema.json").read_text())["paths"]
    for path in ("/v1/files", "/v1/fine_tuning/jobs", "/v1/models", "/v1/batches",
                 "/v1/chat/completions"):  # fmt: skip
        assert path in paths
