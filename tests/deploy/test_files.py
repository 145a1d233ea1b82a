"""deploy/ validated without a container engine: the compose file against the Compose
Specification (compose-spec, a strict parser), the Kubernetes manifests against the
Kubernetes 1.37 OpenAPI schemas (kubernetes-validate, strict: unknown fields fail), and the
start scripts' shape (bash -n, errexit/pipefail/nounset, exec)."""

import json
import re
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from compose_spec import PyCompose

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
K8S_VERSION = "1.37.0"
_VAR = re.compile(r"\$\$|\$\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def _env_example() -> dict[str, str]:
    env = {}
    for line in (DEPLOY / "env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


def interpolate(value, env: dict[str, str]):
    """Compose's variable interpolation: ${X}, ${X:-default}, ${X:?error}, $$."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m):
        if m.group(0) == "$$":
            return "$"
        got = env.get(m["name"])
        if m["op"] in (":-", "-"):
            return got or m["arg"]
        if not got:
            raise KeyError(f"${{{m['name']}}} is required: {m['arg']}")
        return got

    return _VAR.sub(sub, value)


@pytest.fixture(scope="module")
def compose() -> dict:
    raw = yaml.safe_load((DEPLOY / "compose.yaml").read_text())  # resolves << merge keys
    spec = PyCompose.from_json(json.dumps(interpolate(raw, _env_example())))
    spec.validate()  # every network, config and secret a service names is declared
    out = spec.to_dict()
    # What compose-spec leaves to `docker compose config`: named volumes and depends_on.
    for name, svc in out["services"].items():
        for volume in svc.get("volumes", []):
            source = volume.split(":", 1)[0] if isinstance(volume, str) else volume["source"]
            if not source.startswith((".", "/")):
                assert source in out["volumes"], f"{name}: undeclared volume {source}"
        assert set(svc.get("depends_on", {})) <= set(out["services"]), name
    return out


def test_compose_file_is_valid_and_has_every_service(compose):
    assert set(compose["services"]) == {
        "migrate", "web", "worker-cpu", "worker-gpu", "beat", "flower", "superlink",
        "postgres", "redis",
    }  # fmt: skip


def test_compose_processes_run_the_image_start_scripts(compose):
    s = compose["services"]
    assert s["web"]["command"] == ["/app/deploy/bin/web.sh"]
    assert s["worker-cpu"]["command"] == ["/app/deploy/bin/worker-cpu.sh"]
    assert s["worker-gpu"]["command"] == ["/app/deploy/bin/worker-gpu.sh"]
    assert s["beat"]["command"] == ["/app/deploy/bin/beat.sh"]
    assert s["migrate"]["command"] == ["/app/deploy/bin/migrate.sh"]
    for name in ("web", "worker-cpu", "worker-gpu", "beat", "flower", "superlink", "migrate"):
        svc = s[name]
        assert svc["env_file"] == [{"path": ".env"}], name
        assert "enclave-var:/var/lib/enclave" in svc["volumes"], name
        assert svc["read_only"] is True and svc["cap_drop"] == ["ALL"], name


def test_compose_healthchecks_and_start_order(compose):
    s = compose["services"]
    for name in ("web", "worker-cpu", "worker-gpu", "beat", "flower", "superlink", "postgres",
                 "redis"):  # fmt: skip
        assert s[name]["healthcheck"]["test"], name
    assert "/readyz" in " ".join(s["web"]["healthcheck"]["test"])
    for name in ("web", "worker-cpu", "worker-gpu", "beat"):
        deps = s[name]["depends_on"]
        assert deps["postgres"]["condition"] == "service_healthy", name
        assert deps["redis"]["condition"] == "service_healthy", name
        assert deps["migrate"]["condition"] == "service_completed_successfully", name


def test_compose_gpu_worker_reserves_a_gpu_and_takes_the_train_queue(compose):
    gpu = compose["services"]["worker-gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "cu128" in gpu["build"]["args"]["TORCH_INDEX_URL"]
    cpu = compose["services"]["worker-cpu"]
    assert "deploy" not in cpu and "cpu" in cpu["build"]["args"]["TORCH_INDEX_URL"]


def test_compose_beat_is_one_replica_and_flower_needs_auth(compose):
    assert compose["services"]["beat"]["deploy"]["replicas"] == 1
    flower = compose["services"]["flower"]
    assert flower["ports"] == ["127.0.0.1:5555:5555"]  # not published beyond the host
    assert "--basic-auth" in (DEPLOY / "bin" / "flower.sh").read_text()
    assert _env_example()["FLOWER_BASIC_AUTH"].count(":") == 1


def test_compose_superlink_mounts_its_tls_certificates(compose):
    link = compose["services"]["superlink"]
    assert "./certs:/certs:ro" in link["volumes"]
    script = (DEPLOY / "bin" / "superlink.sh").read_text()
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--enable-supernode-auth"):
        assert flag in script
    assert "--insecure" not in script


def test_compose_rejects_what_docker_would_reject():
    """The validator is strict: an unknown key or a bad reference fails."""
    with pytest.raises(ValueError, match="extension key"):
        PyCompose.from_json(json.dumps({"services": {"web": {"image": "x", "replica": 2}}}))
    bad = PyCompose.from_json(
        json.dumps({"services": {"web": {"image": "x", "networks": ["nope"]}}})
    )
    with pytest.raises(ValueError):
        bad.validate()


def _manifests() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def _pod_specs() -> dict[str, dict]:
    return {
        d["metadata"]["name"]: d["spec"]["template"]["spec"]
        for _, d in _manifests()
        if d["kind"] in ("Deployment", "StatefulSet", "Job")
    }


def test_manifests_conform_to_the_kubernetes_schemas():
    docs = _manifests()
    assert len(docs) >= 15
    for name, doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        assert doc["kind"] == "Namespace" or doc["metadata"]["namespace"] == "enclave", name


def test_kubernetes_validation_is_strict():
    web = next(d for _, d in _manifests() if d["kind"] == "Deployment")
    web = json.loads(json.dumps(web))
    web["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(web, K8S_VERSION, strict=True)


def test_kustomization_lists_every_manifest():
    kust = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    files = {p.name for p in (DEPLOY / "k8s").glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kust["resources"]) == files


def test_every_pod_runs_as_non_root_on_a_read_only_root():
    pods = _pod_specs()
    assert set(pods) >= {"web", "worker-cpu", "worker-gpu", "beat", "flower", "superlink",
                         "migrate", "postgres", "redis"}  # fmt: skip
    for name, pod in pods.items():
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
            assert c["resources"]["requests"] and c["resources"]["limits"]["memory"], name


def test_web_probes_and_a_long_startup_probe_for_the_engine():
    web = _pod_specs()["web"]["containers"][0]
    assert web["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert web["readinessProbe"]["httpGet"]["path"] == "/readyz"
    startup = web["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600


def test_beat_is_a_single_replica_that_never_overlaps():
    beat = next(d for _, d in _manifests() if d["metadata"]["name"] == "beat")
    assert beat["spec"]["replicas"] == 1 and beat["spec"]["strategy"]["type"] == "Recreate"


def test_gpu_worker_asks_for_a_gpu_and_takes_the_train_queue():
    gpu = _pod_specs()["worker-gpu"]["containers"][0]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu["command"] == ["/app/deploy/bin/worker-gpu.sh"]
    script = (DEPLOY / "bin" / "worker-gpu.sh").read_text()
    assert re.search(r"-Q train\b", script) and "--concurrency 1" in script
    assert "--prefetch-multiplier 1" in script
    assert re.search(r"-Q default\b", (DEPLOY / "bin" / "worker-cpu.sh").read_text())


def test_the_master_key_is_its_own_secret():
    secrets = {d["metadata"]["name"]: d for _, d in _manifests() if d["kind"] == "Secret"}
    assert set(secrets["enclave-master-key"]["stringData"]) == {
        "ENCLAVE_MASTER_KEY", "ENCLAVE_MASTER_KEY_PREVIOUS",
    }  # fmt: skip
    assert not {k for k in secrets["enclave-secrets"]["stringData"] if "MASTER" in k}


SCRIPTS = sorted([*(DEPLOY / "bin").glob("*.sh"), *(DEPLOY / "local").glob("*.sh")])


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_start_scripts_are_strict_bash(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    if script.name != "_common.sh":  # sourced, not run
        assert "set -o errexit -o pipefail -o nounset" in text
        assert text.startswith("#!/usr/bin/env bash\n")
    if script.parent.name == "bin" and script.name != "_common.sh":
        assert re.search(r"^exec ", text, re.M) or re.search(r"^\s*exec ", text, re.M)


def test_web_runs_gunicorn_with_the_uvicorn_worker_class():
    import uvicorn_worker

    text = (DEPLOY / "bin" / "web.sh").read_text()
    assert "-m gunicorn controlplane.asgi:application" in text
    assert "--worker-class uvicorn_worker.UvicornWorker" in text
    assert uvicorn_worker.UvicornWorker.__name__ == "UvicornWorker"


def test_dockerfile_is_multi_stage_non_root_with_a_volume_and_healthcheck():
    text = (DEPLOY / "Dockerfile").read_text()
    stages = re.findall(r"^FROM \S+ AS (\w+)", text, re.M)
    assert stages == ["builder", "runtime"]
    runtime = text.split("AS runtime", 1)[1]
    assert re.search(r"^USER enclave", runtime, re.M)
    assert "COPY --from=builder /opt/venv /opt/venv" in runtime
    assert 'VOLUME ["/var/lib/enclave"]' in runtime and "HEALTHCHECK" in runtime
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    # Every COPY source exists in the repository (the context is its root).
    root = DEPLOY.parent
    for sources in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
        for src in sources.split():
            assert (root / src).exists(), src


def test_env_example_covers_what_the_files_use():
    env = _env_example()
    for key in ("DATABASE_URL", "CELERY_BROKER_URL", "CACHE_URL", "DJANGO_SECRET_KEY",
                "ENCLAVE_MASTER_KEY", "POSTGRES_PASSWORD", "FLOWER_BASIC_AUTH",
                "ENCLAVE_VAR_DIR", "WEB_CONCURRENCY"):  # fmt: skip
        assert key in env, key
    assert (
        env["DATABASE_URL"].startswith("postgres://") and "@postgres:5432/" in env["DATABASE_URL"]
    )
