"""/v1/fine_tuning/jobs end to end: the real `openai` client, a live uvicorn process, a
real Celery worker on the `train` queue, PostgreSQL and Redis, and LoRA SFT on a tiny
random base model."""

import io
import time

import httpx
import openai
import pytest

from controlplane.tenancy.models import DailyUsage
from controlplane.tuning.models import Adapter, FineTuningJob
from tests.controlplane.test_files_api import _chat_jsonl, _client

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

TERMINAL = {"succeeded", "failed", "cancelled"}


def _training_file(client, tmp_path, n: int = 6) -> str:
    """Short chat examples: the test model's context is 128 tokens."""
    data = _chat_jsonl(n)
    return client.files.create(file=("train.jsonl", io.BytesIO(data)), purpose="fine-tune").id


def _method(**hyperparameters) -> dict:
    hp = {"n_epochs": 1, "batch_size": 2, "max_seq_len": 96, "checkpoint_every": 2}
    return {"type": "supervised", "supervised": {"hyperparameters": {**hp, **hyperparameters}}}


def _wait(client, job_id: str, statuses=TERMINAL, timeout: float = 240.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} still {job.status} after {timeout}s")


def test_fine_tune_then_chat_with_the_result(
    live_server_url, make_tenant, base_model, celery_worker, tmp_path
):
    tenant, key = make_tenant("bank", role="member", vertical="finance")
    client = _client(live_server_url, key)
    training_file = _training_file(client, tmp_path)

    job = client.fine_tuning.jobs.create(
        model=base_model, training_file=training_file, method=_method(), suffix="loans", seed=3
    )
    assert job.object == "fine_tuning.job" and job.status == "queued"
    assert job.training_file == training_file and job.seed == 3

    done = _wait(client, job.id)
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == f"ft:{base_model}:bank:loans:{job.id}"
    assert done.trained_tokens and done.trained_tokens > 0

    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    metrics = [e for e in events if e.type == "metrics"]
    assert metrics and {"step", "loss", "token_accuracy", "lr"} <= set(metrics[0].data)
    messages = [e.message for e in events]
    assert any("successfully completed" in m for m in messages)
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert checkpoints and checkpoints[0].step_number >= checkpoints[-1].step_number

    assert done.fine_tuned_model in {m.id for m in client.models.list().data}
    reply = client.chat.completions.create(
        model=done.fine_tuned_model, messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    assert reply.model == done.fine_tuned_model and reply.usage.completion_tokens > 0
    assert DailyUsage.objects.get(tenant=tenant).training_tokens == done.trained_tokens
    assert [j.id for j in client.fine_tuning.jobs.list().data] == [job.id]


def test_idempotency_key_returns_the_same_job_or_a_409(
    live_server_url, make_tenant, base_model, tmp_path
):
    _tenant, key = make_tenant("bank")
    client = _client(live_server_url, key)
    training_file = _training_file(client, tmp_path)
    headers = {"Idempotency-Key": "create-once-1"}

    first = client.fine_tuning.jobs.create(
        model=base_model, training_file=training_file, method=_method(), extra_headers=headers
    )
    again = client.fine_tuning.jobs.create(
        model=base_model, training_file=training_file, method=_method(), extra_headers=headers
    )
    assert again.id == first.id
    raw = httpx.post(
        f"{live_server_url}/v1/fine_tuning/jobs",
        headers={"Authorization": f"Bearer {key}", **headers},
        json={"model": base_model, "training_file": training_file, "seed": 99},
    )
    assert raw.status_code == 409 and raw.headers["x-should-retry"] == "false"
    assert raw.json()["error"]["code"] == "idempotency_key_reused"
    assert FineTuningJob.objects.count() == 1


def test_cancel_pause_and_resume(live_server_url, make_tenant, base_model, tmp_path):
    """Without a worker the job stays queued, so each transition is deterministic."""
    _tenant, key = make_tenant("bank")
    client = _client(live_server_url, key)
    job = client.fine_tuning.jobs.create(
        model=base_model, training_file=_training_file(client, tmp_path), method=_method()
    )
    assert client.fine_tuning.jobs.pause(job.id).status == "paused"
    assert client.fine_tuning.jobs.resume(job.id).status == "queued"
    assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    with pytest.raises(openai.BadRequestError, match="cannot cancel a job that is cancelled"):
        client.fine_tuning.jobs.cancel(job.id)
    with pytest.raises(openai.BadRequestError, match="cannot resume"):
        client.fine_tuning.jobs.resume(job.id)


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"model": "gpt-99"}, "model"),
        ({"training_file": "file-doesnotexist"}, "training_file"),
        ({"method": _method(n_epochs=0)}, "hyperparameters.n_epochs"),
        ({"method": _method(learning_rate_multiplier="fast")}, "hyperparameters.learning_rate_multiplier"),
        ({"method": _method(warp_drive=True)}, "hyperparameters.warp_drive"),
        ({"suffix": "no spaces allowed"}, "suffix"),
        ({"method": {"type": "reinforcement"}}, "method.reinforcement.grader"),
    ],
    ids=["unknown-model", "unknown-file", "zero-epochs", "non-numeric", "unknown-hp",
         "bad-suffix", "no-grader"],
)  # fmt: skip
def test_bad_job_requests_are_refused_and_nothing_is_queued(
    live_server_url, make_tenant, base_model, tmp_path, change, param
):
    _tenant, key = make_tenant("bank")
    client = _client(live_server_url, key)
    body = {"model": base_model, "training_file": _training_file(client, tmp_path, n=2),
            "method": _method(), **change}  # fmt: skip
    with pytest.raises(openai.BadRequestError) as raised:
        client.fine_tuning.jobs.create(**body)
    assert raised.value.body["param"] == param
    assert FineTuningJob.objects.count() == 0


def test_files_of_the_wrong_kind_or_tenant_are_refused(
    live_server_url, make_tenant, base_model, tmp_path
):
    _a, key_a = make_tenant("bank-a")
    _b, key_b = make_tenant("bank-b")
    a, b = _client(live_server_url, key_a), _client(live_server_url, key_b)
    foreign = _training_file(a, tmp_path)
    broken = b.files.create(
        file=("bad.jsonl", io.BytesIO(b'{"messages": []}\n')), purpose="fine-tune"
    ).id
    batch = b.files.create(file=("b.jsonl", io.BytesIO(_chat_jsonl())), purpose="batch").id

    for file_id, fragment in ((foreign, "no such file"), (broken, "failed validation"),
                              (batch, "not fine-tune")):  # fmt: skip
        with pytest.raises(openai.BadRequestError, match=fragment):
            b.fine_tuning.jobs.create(model=base_model, training_file=file_id)
    job = a.fine_tuning.jobs.create(model=base_model, training_file=foreign, method=_method())
    with pytest.raises(openai.NotFoundError):
        b.fine_tuning.jobs.retrieve(job.id)
    with pytest.raises(openai.NotFoundError):
        b.fine_tuning.jobs.cancel(job.id)
    with pytest.raises(openai.NotFoundError):
        b.fine_tuning.jobs.list_events(job.id)
    assert b.fine_tuning.jobs.list().data == []


def test_concurrent_job_quota_answers_403(live_server_url, make_tenant, base_model, tmp_path):
    tenant, key = make_tenant("bank")
    tenant.max_concurrent_jobs = 1
    tenant.save(update_fields=["max_concurrent_jobs"])
    client = _client(live_server_url, key)
    training_file = _training_file(client, tmp_path)
    client.fine_tuning.jobs.create(model=base_model, training_file=training_file, method=_method())
    with pytest.raises(openai.PermissionDeniedError) as raised:
        client.fine_tuning.jobs.create(model=base_model, training_file=training_file)
    assert raised.value.body["type"] == "insufficient_quota"
    assert not Adapter.objects.exists()


def test_secrets_and_training_data_never_reach_the_logs(
    web_server, make_tenant, base_model, celery_worker
):
    """A full fine-tune with a distinctive record in the data, at DEBUG-level logging of
    the worker, then a grep of every log the run wrote."""
    marker = "Zebulon Quxworth MRN 99-ZQ-4242"
    _tenant, key = make_tenant("clinic", role="admin")
    client = _client(web_server.url, key)
    rows = [{"messages": [{"role": "user", "content": f"Who is patient {i}?"},
                          {"role": "assistant", "content": f"{marker} case {i}."}]}
            for i in range(4)]  # fmt: skip
    data = "".join(__import__("json").dumps(r) + "\n" for r in rows).encode()
    file_id = client.files.create(file=("t.jsonl", io.BytesIO(data)), purpose="fine-tune").id
    job = client.fine_tuning.jobs.create(
        model=base_model, training_file=file_id, method=_method(max_steps=2)
    )
    assert _wait(client, job.id).status == "succeeded"
    client.chat.completions.create(
        model=base_model, messages=[{"role": "user", "content": marker}], max_tokens=2
    )

    logs = web_server.log_text() + celery_worker.log_text()
    assert len(logs) > 0
    for secret in (key, key.split("_", 2)[2], marker, "99-ZQ-4242"):
        assert secret not in logs


def test_reinforcement_job_runs_grpo_with_a_domain_grader(
    live_server_url, make_tenant, base_model, celery_worker
):
    from finetune.domains import SUITES

    _tenant, key = make_tenant("bank", vertical="finance")
    client = _client(live_server_url, key)
    items = SUITES["finance"].generate(4, seed=5)
    rows = [{"messages": i.sft_messages(), "task": i.to_dict()} for i in items]
    data = "".join(__import__("json").dumps(r) + "\n" for r in rows).encode()
    file_id = client.files.create(file=("rl.jsonl", io.BytesIO(data)), purpose="fine-tune").id
    rl = {"type": "reinforcement", "reinforcement": {
        "grader": {"type": "enclave_suite", "name": "finance"},
        "hyperparameters": {"max_steps": 1, "prompts_per_step": 2, "group_size": 2,
                            "max_completion_length": 8, "checkpoint_every": 0}}}  # fmt: skip

    job = client.fine_tuning.jobs.create(model=base_model, training_file=file_id, method=rl)
    done = _wait(client, job.id)

    assert done.status == "succeeded", done.error
    assert done.method.type == "reinforcement"
    metrics = [e for e in client.fine_tuning.jobs.list_events(job.id).data if e.type == "metrics"]
    assert metrics and {"reward_mean", "reward_std", "completion_length"} <= set(metrics[0].data)
    assert done.fine_tuned_model in {m.id for m in client.models.list().data}

    bad = {"type": "reinforcement", "reinforcement": {"grader": {"name": "astrology"}}}
    with pytest.raises(openai.BadRequestError) as raised:
        client.fine_tuning.jobs.create(model=base_model, training_file=file_id, method=bad)
    assert raised.value.body["param"] == "method.reinforcement.grader"
