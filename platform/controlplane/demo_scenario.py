"""The demo's scenario, driven through the public API with the real `openai` client.

A bank fine-tunes on its finance data and chats with the result (streaming); three
hospitals train one adapter together in a federated round, each keeping its data. A
held-out set from the domain suites is scored before and after, by greedy completions
through /v1/chat/completions and the suites' own checkers.
"""

import io
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx

from controlplane.tenancy import selectors as tenancy_selectors
from controlplane.tenancy import services as tenancy_services

HOSPITALS = ("st-anne", "st-bart", "st-clare")
EVAL_SEED = 9_001  # held out: training files use seeds 0..3


@dataclass
class ScenarioSizes:
    train_examples: int = 48  # per tenant
    eval_items: int = 24  # per tenant, held out
    sft_steps: int = 40
    federated_local_steps: int = 10
    max_tokens: int = 96


@dataclass
class Row:
    tenant: str
    model: str
    before: float
    after: float | None = None
    seconds: float | None = None
    tokens: int = 0
    notes: list[str] = field(default_factory=list)


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def _key_for(slug: str, name: str, vertical: str) -> str:
    tenant = tenancy_selectors.tenant_get_by_slug(slug=slug)
    if tenant is None:
        tenant = tenancy_services.tenant_create(slug=slug, name=name, vertical=vertical)
    _key, raw = tenancy_services.api_key_create(tenant=tenant, role="admin", name="demo")
    return raw


def _accuracy(client, model: str, suite_name: str, sizes: ScenarioSizes) -> float:
    """Share of held-out items answered correctly (greedy), through the chat API."""
    from finetune.domains import SUITES
    from finetune.domains.common import score

    items = SUITES[suite_name].generate(sizes.eval_items, seed=EVAL_SEED)

    def ask(item) -> float:
        reply = client.chat.completions.create(
            model=model, messages=item.prompt, max_tokens=sizes.max_tokens, temperature=0
        )
        return score(reply.choices[0].message.content or "", item).correct

    with ThreadPoolExecutor(max_workers=8) as pool:  # the engine batches them together
        results = list(pool.map(ask, items))
    return sum(results) / len(results)


def _upload(client, suite_name: str, n: int, seed: int, families=None) -> str:
    from finetune.domains import SUITES

    items = SUITES[suite_name].generate(n, seed=seed, families=families)
    data = "".join(json.dumps({"messages": i.sft_messages()}) + "\n" for i in items).encode()
    return client.files.create(file=(f"{suite_name}.jsonl", io.BytesIO(data)),
                               purpose="fine-tune").id  # fmt: skip


def _tokens(base_url: str, key: str) -> int:
    data = httpx.get(f"{base_url}/v1/usage", headers={"Authorization": f"Bearer {key}"}).json()
    return sum(d["prompt_tokens"] + d["completion_tokens"] + d["training_tokens"]
               for d in data["data"])  # fmt: skip


def run_scenario(base_url: str, base_model: str, sizes: ScenarioSizes) -> list[Row]:
    import openai

    def client(key: str):
        return openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=2, timeout=600)

    rows: list[Row] = []
    # ---- the bank: LoRA SFT, then a streaming chat with the result -----------------------
    bank_key = _key_for("demo-bank", "Demo Bank", "finance")
    bank = client(bank_key)
    before = _accuracy(bank, base_model, "finance", sizes)
    row = Row("demo-bank", base_model, before)
    rows.append(row)
    _say(f"bank: base accuracy on {sizes.eval_items} held-out finance items: {before:.0%}")
    training_file = _upload(bank, "finance", sizes.train_examples, seed=0)
    started = time.monotonic()
    job = bank.fine_tuning.jobs.create(
        model=base_model, training_file=training_file, suffix="loans", seed=0,
        method={"type": "supervised", "supervised": {"hyperparameters": {
            "max_steps": sizes.sft_steps, "batch_size": 4, "learning_rate_multiplier": 10,
            "checkpoint_every": 0, "max_seq_len": 384}}},
    )  # fmt: skip
    _say(f"bank: fine-tuning job {job.id} queued")
    seen = 0
    while job.status not in ("succeeded", "failed", "cancelled"):
        time.sleep(1)
        job = bank.fine_tuning.jobs.retrieve(job.id)
        events = bank.fine_tuning.jobs.list_events(job.id, limit=100).data
        metrics = [e for e in reversed(events) if e.type == "metrics"]
        for event in metrics[seen:]:
            d = event.data
            if d["step"] % 10 == 0 or d["step"] == sizes.sft_steps:
                _say(f"bank: step {d['step']}: loss {d['loss']:.3f}, "
                     f"token accuracy {d.get('token_accuracy', 0):.2f}")  # fmt: skip
        seen = len(metrics)
    row.seconds = time.monotonic() - started
    if job.status != "succeeded":
        row.notes.append(f"job {job.status}: {job.error}")
        return rows
    row.model = job.fine_tuned_model
    _say(f"bank: {job.fine_tuned_model} ready in {row.seconds:.0f}s; streaming a chat:")
    from finetune.domains import SUITES

    question = SUITES["finance"].generate(1, seed=EVAL_SEED + 1)[0].prompt
    print("         ", end="", flush=True)
    for chunk in bank.chat.completions.create(model=job.fine_tuned_model, messages=question,
                                              max_tokens=sizes.max_tokens, temperature=0,
                                              stream=True):  # fmt: skip
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content.replace("\n", " "), end="", flush=True)
    print(flush=True)
    row.after = _accuracy(bank, job.fine_tuned_model, "finance", sizes)
    row.tokens = _tokens(base_url, bank_key)

    # ---- three hospitals: one federated round, data stays with each -----------------------
    keys = {slug: _key_for(slug, slug.replace("-", " ").title(), "medical") for slug in HOSPITALS}
    clients = {slug: client(k) for slug, k in keys.items()}
    from finetune.domains import SUITES as suites

    families = suites["medical"].families
    files = {}
    for i, slug in enumerate(HOSPITALS):  # non-IID: each hospital mostly sees one family
        files[slug] = _upload(clients[slug], "medical", sizes.train_examples, seed=i + 1,
                              families=[families[i % len(families)]] * 3 + list(families))  # fmt: skip
    h_rows = {}
    for slug in HOSPITALS:
        h_rows[slug] = Row(slug, base_model, _accuracy(clients[slug], base_model, "medical", sizes))
        _say(f"{slug}: base accuracy on held-out medical items: {h_rows[slug].before:.0%}")

    def api(slug: str, method: str, path: str, **kw) -> dict:
        r = httpx.request(method, f"{base_url}/v1{path}", timeout=60,
                          headers={"Authorization": f"Bearer {keys[slug]}"}, **kw)  # fmt: skip
        r.raise_for_status()
        return r.json()

    owner = HOSPITALS[0]
    fed = api(owner, "POST", "/federations", json={
        "name": "Hospital consortium", "base_model": base_model, "min_participants": 3,
        "training_file": files[owner],
        "settings": {"aggregation": "fedavg", "lora_r": 8, "lora_alpha": 16,
                     "local_steps": sizes.federated_local_steps, "batch_size": 4,
                     "learning_rate": 2e-3, "max_seq_len": 384, "eval_generations": 0,
                     "min_available": 3, "min_train": 3},
    })  # fmt: skip
    for slug in HOSPITALS[1:]:
        api(owner, "POST", f"/federations/{fed['id']}/invite", json={"tenant": slug})
        api(slug, "POST", f"/federations/{fed['id']}/accept", json={"training_file": files[slug]})
    _say(f"federation {fed['id']}: 3 hospitals accepted; starting round 1")
    started = time.monotonic()
    fed_round = api(owner, "POST", f"/federations/{fed['id']}/rounds")
    while fed_round["status"] not in ("succeeded", "failed", "cancelled"):
        time.sleep(1)
        fed_round = api(owner, "GET", f"/federations/{fed['id']}/rounds/{fed_round['id']}")
    seconds = time.monotonic() - started
    if fed_round["status"] != "succeeded":
        for slug in HOSPITALS:
            h_rows[slug].notes.append(f"round {fed_round['status']}: {fed_round['error']}")
        rows += h_rows.values()
        return rows
    model = fed_round["global_model"]
    m = fed_round["metrics"]
    _say(f"round 1 done in {seconds:.0f}s: train loss {m['train_loss']:.3f}, "
         f"{m['bytes_up'] / 1e6:.1f} MB up")  # fmt: skip
    for slug in HOSPITALS:
        r = h_rows[slug]
        r.model, r.seconds = model, seconds
        r.after = _accuracy(clients[slug], model, "medical", sizes)
        r.tokens = _tokens(base_url, keys[slug])
    rows += h_rows.values()
    return rows


def print_table(rows: list[Row]) -> None:
    print()
    print(f"  {'tenant':<10} {'model':<52} {'before':>7} {'after':>7} {'job s':>6} {'tokens':>8}")
    for r in rows:
        after = f"{r.after:.0%}" if r.after is not None else "-"
        secs = f"{r.seconds:.0f}" if r.seconds is not None else "-"
        model = r.model if len(r.model) <= 52 else r.model[:49] + "..."
        print(f"  {r.tenant:<10} {model:<52} {r.before:>7.0%} {after:>7} {secs:>6} {r.tokens:>8}")
        for note in r.notes:
            print(f"  {'':<10} ! {note}")
    print()
