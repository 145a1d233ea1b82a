"""Load test of the production topology on this machine (deploy/local): N concurrent
streaming chat clients plus API calls for a fixed time, with quotas and memory watched.

    .venv/bin/python bench/load.py                          # 60 s, 8 chat clients
    .venv/bin/python bench/load.py --duration 120 --clients 16
    .venv/bin/python bench/load.py --smoke --out /tmp/l.json  # seconds, 2 clients; a test

Without ``--url`` it starts deploy/local/start.sh itself (PostgreSQL and Redis must be
running; DATABASE_URL defaults to a database ``enclave_load`` it creates), installs a tiny
random base model when ENCLAVE_MODELS_DIR has none, and stops the topology at the end.
With ``--url`` and ``--run-dir`` it drives a topology someone else started (the tests).

Two tenants are created through the tenancy services, in the topology's database:

- ``load-main``: the chat clients (stream=true, include_usage) and the API clients
  (GET /v1/files, GET /v1/models), with quotas far above the offered load;
- ``load-limited``: ``--limited-rpm`` requests per minute, polled by one client faster
  than that. It must get 429s carrying Retry-After while load-main gets none.

Measured: chat latency (whole stream) and time to first token p50/p99, completion tokens
per second, requests per second, API latency p50/p99, errors by kind (0 expected), the
limited tenant's 200s and 429s, and the RSS of every web process (gunicorn's arbiter and
its uvicorn workers) sampled through the run. Before the clock starts, rounds of
concurrent requests warm every worker's engine until the web processes' memory stops
growing. Memory counts as bounded when the sum at the end is within 25% (plus 64 MiB) of
the sum after the first fifth of the run.

Writes JSON to bench/results/load.json (or ``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Summarise the loan covenant in one short sentence."


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


class Results:
    def __init__(self) -> None:
        self.chat_latency: list[float] = []
        self.ttft: list[float] = []
        self.completion_tokens = 0
        self.chat_requests = 0
        self.api_latency: dict[str, list[float]] = {"files.list": [], "models.list": []}
        self.errors: dict[str, int] = {}
        self.limited = {"ok": 0, "rate_limited": 0, "retry_after_missing": 0, "other": 0}
        self.retry_after: list[float] = []
        self.main_rate_limited = 0

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


async def chat_client(client: httpx.AsyncClient, model: str, args, res: Results, stop: float):
    body = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": args.max_tokens,
        "temperature": 0.7,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    while time.monotonic() < stop:
        t0 = time.monotonic()
        first = None
        usage = None
        try:
            async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
                if resp.status_code != 200:
                    await resp.aread()
                    if resp.status_code == 429:
                        res.main_rate_limited += 1
                    res.error(f"chat HTTP {resp.status_code}")
                    continue
                done = False
                async for line in resp.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        done = True
                        break
                    chunk = json.loads(data)
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    for choice in chunk.get("choices", []):
                        if first is None and choice.get("delta", {}).get("content"):
                            first = time.monotonic()
            if not done or usage is None:
                res.error("chat stream ended without usage and [DONE]")
                continue
        except (httpx.HTTPError, json.JSONDecodeError) as exc:
            res.error(f"chat {type(exc).__name__}")
            continue
        res.chat_requests += 1
        res.chat_latency.append(time.monotonic() - t0)
        res.ttft.append((first or time.monotonic()) - t0)
        res.completion_tokens += usage["completion_tokens"]


async def api_client(client: httpx.AsyncClient, res: Results, stop: float, pause: float):
    paths = {"files.list": "/v1/files", "models.list": "/v1/models"}
    while time.monotonic() < stop:
        for name, path in paths.items():
            t0 = time.monotonic()
            try:
                resp = await client.get(path)
            except httpx.HTTPError as exc:
                res.error(f"{name} {type(exc).__name__}")
                continue
            if resp.status_code != 200:
                if resp.status_code == 429:
                    res.main_rate_limited += 1
                res.error(f"{name} HTTP {resp.status_code}")
                continue
            res.api_latency[name].append(time.monotonic() - t0)
        await asyncio.sleep(pause)


async def limited_client(client: httpx.AsyncClient, res: Results, stop: float, pause: float):
    """Polls faster than its tenant's requests_per_minute: expects 429 + Retry-After."""
    while time.monotonic() < stop:
        try:
            resp = await client.get("/v1/models")
        except httpx.HTTPError:
            res.limited["other"] += 1
        else:
            if resp.status_code == 200:
                res.limited["ok"] += 1
            elif resp.status_code == 429:
                res.limited["rate_limited"] += 1
                if "retry-after" in resp.headers:
                    res.retry_after.append(float(resp.headers["retry-after"]))
                else:
                    res.limited["retry_after_missing"] += 1
            else:
                res.limited["other"] += 1
        await asyncio.sleep(pause)


def web_processes(run_dir: Path) -> list[psutil.Process]:
    """gunicorn's arbiter (pid file of deploy/local) and its uvicorn workers."""
    leader = psutil.Process(int((run_dir / "pids" / "web.pid").read_text()))
    return [leader, *leader.children(recursive=True)]


def web_rss_bytes(run_dir: Path) -> int:
    total = 0
    for proc in web_processes(run_dir):
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


async def memory_sampler(run_dir: Path, samples: list[dict], stop: float, every: float):
    t0 = time.monotonic()
    while time.monotonic() < stop:
        per_pid = {}
        for proc in web_processes(run_dir):
            try:
                per_pid[proc.pid] = proc.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        samples.append(
            {"t": round(time.monotonic() - t0, 2), "rss_bytes": sum(per_pid.values()),
             "processes": len(per_pid), "max_process_rss_bytes": max(per_pid.values())}
        )  # fmt: skip
        await asyncio.sleep(every)


async def run_load(args, url: str, keys: dict[str, str], run_dir: Path) -> dict:
    res = Results()
    samples: list[dict] = []
    limits = httpx.Limits(max_connections=args.clients + args.api_clients + 8)
    timeout = httpx.Timeout(120.0, connect=10.0)

    def client(key: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=url, headers={"Authorization": f"Bearer {key}"}, limits=limits,
            timeout=timeout,
        )  # fmt: skip

    async with client(keys["main"]) as main, client(keys["limited"]) as limited:
        # Warm every web worker's engine (loaded on first use) before the clock starts. The
        # kernel, not we, picks the worker of each connection: send rounds of concurrent
        # requests until the web processes' memory stops growing (at most six rounds).
        last = 0
        for _ in range(6):
            await asyncio.gather(
                *(
                    chat_client(main, args.model, args, Results(), time.monotonic() + 0.01)
                    for _ in range(4 * max(1, args.web_concurrency))
                )
            )
            rss = web_rss_bytes(run_dir)
            if last and rss < 1.03 * last:
                break
            last = rss
        t0 = time.monotonic()
        stop = t0 + args.duration
        limited_pause = 0.1  # far above its quota
        await asyncio.gather(
            *(chat_client(main, args.model, args, res, stop) for _ in range(args.clients)),
            *(api_client(main, res, stop, args.api_pause) for _ in range(args.api_clients)),
            limited_client(limited, res, stop, limited_pause),
            memory_sampler(run_dir, samples, stop, args.sample_every),
        )
        elapsed = time.monotonic() - t0
    return summarise(args, res, samples, elapsed)


def summarise(args, res: Results, samples: list[dict], elapsed: float) -> dict:
    def ms(values: list[float], q: float) -> float | None:
        p = percentile(values, q)
        return None if p is None else round(p * 1000, 1)

    api_all = [v for vs in res.api_latency.values() for v in vs]
    warm_index = len(samples) // 5
    baseline = samples[warm_index]["rss_bytes"] if samples else 0
    last = samples[-1]["rss_bytes"] if samples else 0
    peak = max((s["rss_bytes"] for s in samples), default=0)
    bounded = bool(samples) and last <= baseline * 1.25 + (64 << 20)
    limited_ok = (
        res.limited["rate_limited"] > 0
        and res.limited["retry_after_missing"] == 0
        and res.limited["other"] == 0
    )
    return {
        "benchmark": "load",
        "mode": "smoke" if args.smoke else "full",
        "config": {
            "duration_s": args.duration,
            "chat_clients": args.clients,
            "api_clients": args.api_clients,
            "max_tokens": args.max_tokens,
            "web_concurrency": args.web_concurrency,
            "limited_rpm": args.limited_rpm,
            "model": args.model,
            "cpu_count": os.cpu_count(),
        },  # fmt: skip
        "elapsed_s": round(elapsed, 2),
        "chat": {
            "requests": res.chat_requests,
            "latency_ms_p50": ms(res.chat_latency, 50),
            "latency_ms_p99": ms(res.chat_latency, 99),
            "ttft_ms_p50": ms(res.ttft, 50),
            "ttft_ms_p99": ms(res.ttft, 99),
            "completion_tokens": res.completion_tokens,
            "tokens_per_s": round(res.completion_tokens / elapsed, 2) if elapsed else 0.0,
            "requests_per_s": round(res.chat_requests / elapsed, 3) if elapsed else 0.0,
        },
        "api": {
            name: {"requests": len(v), "latency_ms_p50": ms(v, 50), "latency_ms_p99": ms(v, 99)}
            for name, v in res.api_latency.items()
        }
        | {"requests_per_s": round(len(api_all) / elapsed, 2) if elapsed else 0.0},
        "errors": {"total": sum(res.errors.values()), "by_kind": res.errors},
        "quota": {
            "limited_tenant": dict(res.limited),
            "retry_after_s_min": min(res.retry_after, default=None),
            "retry_after_s_max": max(res.retry_after, default=None),
            "main_tenant_rate_limited": res.main_rate_limited,
            "enforced": limited_ok and res.main_rate_limited == 0,
        },
        "memory": {
            "web_processes": samples[-1]["processes"] if samples else 0,
            "rss_mib_after_warmup": round(baseline / 2**20, 1),
            "rss_mib_peak": round(peak / 2**20, 1),
            "rss_mib_end": round(last / 2**20, 1),
            "max_process_rss_mib": round(
                max((s["max_process_rss_bytes"] for s in samples), default=0) / 2**20, 1
            ),
            "samples": len(samples),
            "bounded": bounded,
        },
    }


def provision(args) -> dict[str, str]:
    """Two tenants and their API keys, written through the tenancy services."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings")
    for path in (str(ROOT), str(ROOT / "platform")):
        if path not in sys.path:
            sys.path.insert(0, path)
    import django

    django.setup()
    from controlplane.tenancy import services
    from controlplane.tenancy.models import Tenant

    suffix = uuid.uuid4().hex[:6]
    keys = {}
    for name, rpm in (("main", 1_000_000), ("limited", args.limited_rpm)):
        tenant = services.tenant_create(slug=f"load-{name}-{suffix}", name=f"Load {name}")
        Tenant.objects.filter(pk=tenant.pk).update(
            requests_per_minute=rpm, tokens_per_minute=1_000_000_000
        )
        _key, keys[name] = services.api_key_create(tenant=tenant, role="member")
    return keys


def print_table(r: dict) -> None:
    c, q, m = r["chat"], r["quota"], r["memory"]
    rows = [
        ("chat requests", c["requests"]),
        ("chat latency p50 / p99 (ms)", f"{c['latency_ms_p50']} / {c['latency_ms_p99']}"),
        ("time to first token p50 / p99 (ms)", f"{c['ttft_ms_p50']} / {c['ttft_ms_p99']}"),
        ("completion tokens/s", c["tokens_per_s"]),
        ("chat requests/s", c["requests_per_s"]),
    ]
    for name in ("files.list", "models.list"):
        a = r["api"][name]
        rows.append(
            (f"{name} n, p50 / p99 (ms)",
             f"{a['requests']}, {a['latency_ms_p50']} / {a['latency_ms_p99']}")
        )  # fmt: skip
    rows += [
        ("errors (load-main)", f"{r['errors']['total']} {r['errors']['by_kind'] or ''}"),
        ("limited tenant 200 / 429", f"{q['limited_tenant']['ok']} / "
         f"{q['limited_tenant']['rate_limited']} (Retry-After {q['retry_after_s_min']}.."
         f"{q['retry_after_s_max']} s)"),
        ("load-main 429s", q["main_tenant_rate_limited"]),
        ("quota enforced", q["enforced"]),
        ("web RSS MiB warm / peak / end", f"{m['rss_mib_after_warmup']} / {m['rss_mib_peak']} "
         f"/ {m['rss_mib_end']} ({m['web_processes']} processes)"),
        ("memory bounded", m["bounded"]),
    ]  # fmt: skip
    cfg = r["config"]
    print(
        f"\nEnclave load ({r['mode']}): {cfg['chat_clients']} streaming chat clients, "
        f"{cfg['api_clients']} API clients, {r['elapsed_s']} s, max_tokens "
        f"{cfg['max_tokens']}, {cfg['web_concurrency']} web workers, {cfg['cpu_count']} CPUs"
    )
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


def ensure_database(url: str) -> None:
    import psycopg
    from psycopg import sql

    name = url.rsplit("/", 1)[1]
    admin = url.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def ensure_model(models_dir: Path, name: str) -> None:
    if (models_dir / name / "config.json").exists():
        return
    sys.path.insert(0, str(ROOT))
    from tests.inference.test_engine import make_model_dir  # the suite's tiny random model

    (models_dir / name).mkdir(parents=True, exist_ok=True)
    make_model_dir(models_dir / name, {"max_position_embeddings": 1024})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_local(args) -> tuple[str, Path, object]:
    """deploy/local/start.sh on its own database, broker db and var dir; returns the URL,
    the run dir and a function that runs deploy/local/stop.sh."""
    env = os.environ
    env.setdefault("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/enclave_load")
    env.setdefault("CELERY_BROKER_URL", "redis://127.0.0.1:6379/5")
    env.setdefault("CACHE_URL", "redis://127.0.0.1:6379/6")
    env.setdefault("ENCLAVE_VAR_DIR", str(ROOT / "var" / "load"))
    env.setdefault("ENCLAVE_MODELS_DIR", str(Path(env["ENCLAVE_VAR_DIR"]) / "models"))
    env["WEB_CONCURRENCY"] = str(args.web_concurrency)
    port = free_port()
    env["ENCLAVE_WEB_PORT"] = str(port)
    env["ENCLAVE_SUPERLINK_PORT"] = str(free_port())
    run_dir = Path(env["ENCLAVE_VAR_DIR"]) / "local"
    env["ENCLAVE_LOCAL_RUN_DIR"] = str(run_dir)
    ensure_database(env["DATABASE_URL"])
    ensure_model(Path(env["ENCLAVE_MODELS_DIR"]), args.model)
    subprocess.run([str(ROOT / "deploy" / "local" / "start.sh")], check=True)

    def stop() -> None:
        subprocess.run([str(ROOT / "deploy" / "local" / "stop.sh")], check=True)

    return f"http://127.0.0.1:{port}", run_dir, stop


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    p.add_argument("--clients", type=int, default=8, help="concurrent streaming chat clients")
    p.add_argument("--api-clients", type=int, default=2, help="clients listing files, models")
    p.add_argument("--api-pause", type=float, default=0.05, help="seconds between API rounds")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--limited-rpm", type=int, default=20, help="the limited tenant's quota")
    p.add_argument("--model", default="enclave-load", help="base model to chat with")
    p.add_argument("--web-concurrency", type=int, default=2, help="gunicorn workers")
    p.add_argument("--sample-every", type=float, default=0.5, help="RSS sampling period (s)")
    p.add_argument("--smoke", action="store_true", help="a few seconds with 2 clients")
    p.add_argument("--url", help="an already running topology (else deploy/local is started)")
    p.add_argument("--run-dir", type=Path, help="its deploy/local run dir (web.pid)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "load.json")
    args = p.parse_args(argv)
    if args.smoke:
        args.duration, args.clients, args.api_clients = 4.0, 2, 1
        args.max_tokens, args.limited_rpm, args.api_pause = 8, 5, 0.2

    stop = None
    if args.url:
        if not args.run_dir:
            p.error("--url needs --run-dir (for the web processes' pid file)")
        url, run_dir = args.url.rstrip("/"), args.run_dir
    else:
        url, run_dir, stop = start_local(args)
    try:
        keys = provision(args)
        result = asyncio.run(run_load(args, url, keys, run_dir))
    finally:
        if stop is not None:
            stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
