"""`make demo`: the platform end to end on whatever the settings point at.

Migrates, starts a web process (uvicorn) and a Celery worker, waits for /readyz, creates
the demo tenant through its service, runs one job through the worker and prints a
summary. Everything it starts it stops again, unless asked to keep serving.
"""

import json
import signal
import threading
import time
import urllib.request
from dataclasses import dataclass

from django.conf import settings
from django.core.management import call_command

from controlplane import launch
from controlplane.jobs import selectors as job_selectors
from controlplane.jobs import services as job_services
from controlplane.jobs.models import LeasedJob
from controlplane.tenancy import selectors as tenancy_selectors
from controlplane.tenancy import services as tenancy_services


@dataclass
class DemoOptions:
    serve: bool = False
    port: int | None = None
    job_timeout: float = 120.0
    scenario: bool = True  # the bank and hospitals scenario (needs a base model)
    fast: bool = False  # smaller sizes (the test suite uses this)
    model: str | None = None  # base model name; default: enclave-tiny, else the first one


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def run_demo(options: DemoOptions) -> int:
    """Run the demo; returns the process exit code (0 when every step succeeded)."""
    started = time.monotonic()
    logs = settings.VAR_DIR / "logs"
    _say(f"settings: database={settings.DATABASES['default']['ENGINE'].rsplit('.', 1)[-1]}, "
         f"broker={settings.CELERY_BROKER_URL.split('://')[0]}, var={settings.VAR_DIR}")  # fmt: skip
    call_command("migrate", interactive=False, verbosity=0)
    _say("database migrated")

    port = options.port or launch.free_port()
    base_url = f"http://127.0.0.1:{port}"
    env = launch.process_env()
    processes: list[launch.ManagedProcess] = []
    stop_requested = threading.Event()

    def _on_signal(signum, _frame):
        stop_requested.set()

    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        web = launch.ManagedProcess(
            "web", launch.web_command(port=port), log_path=logs / "web.log", env=env
        )
        processes.append(web)
        worker = launch.ManagedProcess(
            "worker", launch.worker_command(name="demo"), log_path=logs / "worker.log", env=env
        )
        processes.append(worker)
        launch.wait_until_ready(base_url, timeout=60, process=web)
        _say(f"web ready at {base_url} (pid {web.pid}); worker pid {worker.pid}")

        tenant = tenancy_selectors.tenant_get_by_slug(slug="demo-bank")
        if tenant is None:
            tenant = tenancy_services.tenant_create(
                slug="demo-bank", name="Demo Bank", vertical="finance"
            )
        _say(f"tenant {tenant.slug!r} ({tenant.vertical})")

        job = job_services.diagnostic_job_create(steps=3, step_seconds=0.2)
        _say(f"diagnostic job {job.pk} queued")
        deadline = time.monotonic() + options.job_timeout
        while True:
            job = job_selectors.diagnostic_job_get(job_id=job.pk)
            if job.status in LeasedJob.TERMINAL or time.monotonic() > deadline:
                break
            if stop_requested.is_set():
                _say("interrupted")
                return 130
            time.sleep(0.2)
        with urllib.request.urlopen(f"{base_url}/readyz", timeout=5) as resp:
            ready = json.load(resp)["status"]

        took = time.monotonic() - started
        ok = job.status == LeasedJob.Status.SUCCEEDED
        print()
        print("  Enclave demo summary")
        print(f"  web          {base_url}  (/readyz: {ready})")
        print(f"  tenant       {tenant.slug}  {tenant.name}  vertical={tenant.vertical}")
        print(f"  job          diagnostic #{job.pk}  status={job.status}  attempts={job.attempts}")
        if job.result:
            print(f"  worker       pid {job.result['worker_pid']} on {job.result['worker_host']}")
        if job.error:
            print(f"  error        {job.error}")
        print(f"  took         {took:.1f}s")
        print()
        if not ok:
            _say(f"job did not succeed; worker log: {worker.log_path}")
            return 1
        if options.scenario:
            code = _scenario(base_url, options)
            if code:
                _say(f"scenario failed; logs: {web.log_path}, {worker.log_path}")
                return code
        if options.serve:
            _say(f"serving at {base_url}/ (admin at {base_url}/admin/, API docs at "
                 f"{base_url}/api/docs/); press Ctrl-C to stop")  # fmt: skip
            while not stop_requested.wait(1.0):
                for p in processes:
                    if p.proc.poll() is not None:
                        _say(f"{p.name} exited; stopping")
                        return 1
        return 0
    finally:
        for p in reversed(processes):
            p.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
        if processes:
            _say("stopped web and worker")


def _scenario(base_url: str, options: DemoOptions) -> int:
    from controlplane.demo_scenario import ScenarioSizes, print_table, run_scenario
    from controlplane.tuning.selectors import base_models

    names = [m.name for m in base_models()]
    model = options.model or ("enclave-tiny" if "enclave-tiny" in names else None)
    model = model or (names[0] if names else None)
    if model is None or model not in names:
        _say(f"no base model {model or ''} under {settings.ENCLAVE_MODELS_DIR}: "
             "cannot run the scenario")  # fmt: skip
        return 1
    sizes = ScenarioSizes()
    if options.fast:
        sizes = ScenarioSizes(train_examples=8, eval_items=4, sft_steps=4,
                              federated_local_steps=2, max_tokens=16)  # fmt: skip
    _say(f"scenario on base model {model!r}")
    started = time.monotonic()
    rows = run_scenario(base_url, model, sizes)
    print_table(rows)
    _say(f"scenario took {time.monotonic() - started:.0f}s")
    return 1 if any(r.after is None for r in rows) or len(rows) < 4 else 0
