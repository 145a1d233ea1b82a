"""deploy/local end to end: start.sh brings up the production topology on this machine
(gunicorn with uvicorn workers, Celery workers on `default` and `train`, beat, the Flower
SuperLink) on the suite's database; the real `openai` client uploads, lists, chats
(streaming and not) and fine-tunes through it; bench/load.py --smoke drives it; stop.sh
ends it and nothing is left running."""

import io
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import openai
import psutil
import pytest

from tests.controlplane.test_files_api import _chat_jsonl
from tests.controlplane.test_fine_tuning_api import _method, _wait

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Local:
    url: str
    run_dir: Path
    env: dict

    def stop(self) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(ROOT / "deploy/local/stop.sh")], env=self.env, capture_output=True, text=True,
            timeout=60, check=True,
        )  # fmt: skip

    def processes(self) -> list[psutil.Process]:
        procs = []
        for pidfile in (self.run_dir / "pids").glob("*.pid"):
            leader = psutil.Process(int(pidfile.read_text()))
            procs += [leader, *leader.children(recursive=True)]
        return procs


@pytest.fixture(scope="module")
def local(process_env, test_database_owner_url, base_model, tmp_path_factory):
    from controlplane import launch

    run_dir = tmp_path_factory.mktemp("local") / "run"
    port = launch.free_port()
    env = {
        **process_env,
        "DATABASE_OWNER_URL": test_database_owner_url,  # migrate.sh; the rest run as the app role
        "ENCLAVE_LOCAL_RUN_DIR": str(run_dir),
        "ENCLAVE_WEB_PORT": str(port),
        "ENCLAVE_SUPERLINK_PORT": str(launch.free_port()),
        "WEB_CONCURRENCY": "1",
        "PYTHON": sys.executable,
    }
    started = subprocess.run(
        [str(ROOT / "deploy/local/start.sh")], env=env, capture_output=True, text=True,
        timeout=180,
    )  # fmt: skip
    assert started.returncode == 0, started.stderr + _logs(run_dir)
    topology = Local(f"http://127.0.0.1:{port}", run_dir, env)
    try:
        yield topology
    finally:
        topology.stop()


def _logs(run_dir: Path) -> str:
    return "".join(
        f"\n--- {p.name}\n{p.read_text(errors='replace')[-2000:]}"
        for p in sorted((run_dir / "logs").glob("*.log"))
    )


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_the_topology_runs_the_production_processes(local):
    names = {p.stem for p in (local.run_dir / "pids").glob("*.pid")}
    assert names == {"web", "worker-cpu", "worker-gpu", "beat", "superlink"}
    web = psutil.Process(int((local.run_dir / "pids/web.pid").read_text()))
    assert "gunicorn" in web.cmdline() and "uvicorn_worker.UvicornWorker" in web.cmdline()
    assert web.children(), "gunicorn has no uvicorn worker"
    cpu = " ".join(
        psutil.Process(int((local.run_dir / "pids/worker-cpu.pid").read_text())).cmdline()
    )
    gpu = " ".join(
        psutil.Process(int((local.run_dir / "pids/worker-gpu.pid").read_text())).cmdline()
    )
    assert "-Q default" in cpu and "-Q train" in gpu and "--prefetch-multiplier 1" in gpu
    assert (
        "--ssl-certfile"
        in psutil.Process(int((local.run_dir / "pids/superlink.pid").read_text())).cmdline()
    )


def test_the_processes_connect_as_the_application_role_not_the_owner(local):
    from django.db import connection

    from tests.conftest import APP_ROLE, wait_for

    assert f"granted {APP_ROLE} row access" in (local.run_dir / "logs/migrate.log").read_text()
    for pidfile in (local.run_dir / "pids").glob("*.pid"):
        env = psutil.Process(int(pidfile.read_text())).environ()
        assert env["DATABASE_URL"].startswith(f"postgres://{APP_ROLE}@"), pidfile.stem
        assert "DATABASE_OWNER_URL" not in env, pidfile.stem

    def users():
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT DISTINCT usename FROM pg_stat_activity WHERE datname = "
                "current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
            )
            return {row[0] for row in cursor}

    assert wait_for(users, timeout=30, what="a connection from the topology") == {APP_ROLE}


def test_openai_client_uploads_chats_and_fine_tunes(local, make_tenant, base_model):
    _tenant, key = make_tenant("deploy-bank", role="member", vertical="finance")
    client = openai.OpenAI(base_url=f"{local.url}/v1", api_key=key, max_retries=0, timeout=60)

    uploaded = client.files.create(
        file=("train.jsonl", io.BytesIO(_chat_jsonl(4))), purpose="fine-tune"
    )
    assert uploaded.id in {f.id for f in client.files.list().data}
    assert base_model in {m.id for m in client.models.list().data}

    messages = [{"role": "user", "content": "hello"}]
    reply = client.chat.completions.create(model=base_model, messages=messages, max_tokens=4)
    assert reply.object == "chat.completion" and reply.usage.completion_tokens > 0
    chunks = list(
        client.chat.completions.create(
            model=base_model,
            messages=messages,
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
    )
    assert any(c.choices and c.choices[0].delta.content for c in chunks)
    assert chunks[-1].usage.completion_tokens > 0

    job = client.fine_tuning.jobs.create(
        model=base_model, training_file=uploaded.id,
        method=_method(max_steps=2, checkpoint_every=1), suffix="deploy",
    )  # fmt: skip
    done = _wait(client, job.id, timeout=150)
    assert done.status == "succeeded", f"{done.error}{_logs(local.run_dir)}"
    steps = {e.data["step"] for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data
             if e.type == "metrics"}  # fmt: skip
    assert max(steps) == 2
    # The train-queue worker ran it; the default one only reaps leases.
    assert "tuning.run_fine_tuning_job[" in (local.run_dir / "logs/worker-gpu.log").read_text()
    assert "tuning.run_fine_tuning_job[" not in (local.run_dir / "logs/worker-cpu.log").read_text()


def test_load_smoke_writes_its_figures(local, base_model, tmp_path):
    out = tmp_path / "load.json"
    ran = subprocess.run(
        [sys.executable, "bench/load.py", "--smoke", "--url", local.url, "--run-dir",
         str(local.run_dir), "--model", base_model, "--web-concurrency", "1", "--out", str(out)],
        cwd=ROOT, env=local.env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stdout + ran.stderr
    r = json.loads(out.read_text())
    assert r["mode"] == "smoke" and r["config"]["chat_clients"] == 2
    assert r["errors"]["total"] == 0, r["errors"]
    assert r["chat"]["requests"] >= 2 and r["chat"]["completion_tokens"] > 0
    assert 0 < r["chat"]["ttft_ms_p50"] <= r["chat"]["latency_ms_p99"]
    assert r["api"]["files.list"]["requests"] > 0 and r["api"]["models.list"]["requests"] > 0
    quota = r["quota"]
    assert quota["limited_tenant"]["rate_limited"] > 0 and quota["retry_after_s_min"] >= 1
    assert quota["main_tenant_rate_limited"] == 0 and quota["enforced"] is True
    assert r["memory"]["samples"] > 0 and r["memory"]["web_processes"] >= 2
    assert r["memory"]["bounded"] is True
    assert "time to first token" in ran.stdout


def test_stop_leaves_nothing_behind(local):
    procs = local.processes()
    assert len(procs) >= 7  # 5 leaders, gunicorn's worker, the Celery pools, superexec
    tag = (local.run_dir / "tag").read_text().strip()
    stopped = local.stop()
    assert "stopped 5 process groups" in stopped.stdout
    assert [p.pid for p in procs if _alive(p)] == []
    assert not list((local.run_dir / "pids").glob("*.pid"))
    tagged = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("ENCLAVE_LOCAL_TAG") == tag and _alive(proc):
                tagged.append(proc.pid)
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            pass
    assert tagged == []
    assert "nothing to stop" in local.stop().stdout
