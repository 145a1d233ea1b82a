"""The serving engine: requests in, tokens out, many at once.

    engine = Engine("models/tiny", max_batch_tokens=256, kv_cache_bytes=64 << 20)
    [c] = engine.generate([Request(prompt="Hi", sampling=SamplingParams(max_tokens=8))])
    for delta in engine.stream(Request(messages=[{"role": "user", "content": "Hi"}])):
        print(delta.text, end="")

A trainer serves its current policy without files: ``Engine(path, model=base_view)`` shares
an already-loaded model's (frozen, FP8) weights, and ``register_adapter(name, config,
tensors)`` installs or replaces an in-memory LoRA adapter, which requests name as
``adapter="memory:<name>"`` (GRPO samples its groups this way, see ``finetune/grpo.py``).

One background thread owns the model, the paged latent cache and the scheduler. Callers
on any thread (or an asyncio loop, via ``astream``) hand requests over a queue and receive
``Delta`` objects through a per-request sink; nothing else is shared, so the engine is safe
to call concurrently. Each step the thread takes new requests and cancellations, asks the
scheduler for a plan (continuous batching with chunked prefill, see
``inference/scheduler.py``), runs it (``inference/decode.py``), samples one token for each
sequence whose chunk reached its end, and emits text deltas.
"""

from __future__ import annotations

import asyncio
import dataclasses
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from inference.chat import (
    IncrementalDetokenizer,
    apply_chat_template,
    load_chat_template,
    load_tokenizer,
    special_tokens,
)
from inference.checkpoint import load_model
from inference.decode import Chunk, LatentRunner
from inference.kv_cache import PagedLatentCache
from inference.lora import MEMORY_PREFIX, AdapterCache, check_adapter_dir
from inference.sampling import SamplingParams, TokenLogprob, make_generator, sample
from inference.scheduler import Scheduler, Sequence

FINISH_REASONS = ("stop", "length", "cancelled")


@dataclass
class Request:
    """What to generate. Give exactly one of ``prompt`` (text), ``messages`` (chat, rendered
    with the model's or the adapter's chat template) or ``prompt_token_ids``."""

    prompt: str | None = None
    messages: list[dict] | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    adapter: str | None = None  # a PEFT LoRA directory, "memory:<name>", or None (base)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    prompt_token_ids: list[int] | None = None


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Delta:
    """A piece of a streamed completion. The last one has ``finish_reason`` and ``usage``."""

    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    usage: Usage | None = None


@dataclass
class Completion:
    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage
    logprobs: list[TokenLogprob] | None = None


class _State:
    """Per-request data the scheduler thread keeps next to the Sequence."""

    def __init__(self, request: Request, sink, detok: IncrementalDetokenizer | None):
        self.request, self.sink, self.detok = request, sink, detok
        self.params = request.sampling
        self.generator = make_generator(request.sampling.seed)
        self.text = ""  # decoded output so far (stop strings cut it)
        self.sent = 0  # characters of text already emitted
        self.cut = False  # a stop string ended the text
        self.pending_ids: list[int] = []
        self.pending_logprobs: list[TokenLogprob] = []
        self.prompt_tensor: torch.Tensor | None = None


class Engine:
    """Continuous-batching engine over one model directory (config.json, safetensors,
    optionally tokenizer.json and a chat template).

    ``kv_cache_bytes`` sizes the latent cache pool; ``max_batch_tokens`` caps the tokens of
    one step (decodes plus prefill chunks); ``max_active_adapters`` caps the LoRA adapter
    directories held in memory. ``model``: an already-loaded ``inference`` Transformer of
    ``model_path``'s config to serve instead of loading one (its weights are shared, never
    copied or changed; ``dtype``, ``fp8`` and ``device`` then come from it). Raises
    ValueError for impossible sizes, and CheckpointError (a ValueError) for a bad model
    directory. Call ``close()`` (or use ``with``) to stop the scheduler thread.
    """

    def __init__(
        self,
        model_path: str | Path,
        *,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        fp8: bool | None = None,
        max_batch_tokens: int = 512,
        kv_cache_bytes: int = 256 << 20,
        max_active_adapters: int = 4,
        block_size: int = 16,
        max_num_seqs: int = 256,
        model: torch.nn.Module | None = None,
    ):
        self.model_path = Path(model_path)
        if model is None:
            model = load_model(self.model_path, device, dtype, fp8)
        else:
            dtype = model.compute_dtype
            device = model.model.embed_tokens.weight.device
        self.model = model
        self.config = self.model.config
        c = self.config
        self.cache = PagedLatentCache(
            c.num_hidden_layers,
            c.kv_lora_rank + c.qk_rope_head_dim,
            block_size=block_size,
            kv_cache_bytes=kv_cache_bytes,
            dtype=dtype,
            device=device,
        )
        self.runner = LatentRunner(self.model, self.cache)
        self.adapters = AdapterCache(self.model, max_active_adapters, dtype, device)
        self.scheduler = Scheduler(self.cache, self.adapters, max_batch_tokens, max_num_seqs)
        self.tokenizer = None
        if (self.model_path / "tokenizer.json").is_file():
            self.tokenizer = load_tokenizer(self.model_path)
        self.chat_template = load_chat_template(self.model_path)
        self.special_tokens = special_tokens(self.model_path)
        eos = c.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])

        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._seqs: dict[str, Sequence] = {}
        self._closed = threading.Event()
        self.steps = 0
        self._thread = threading.Thread(target=self._loop, name="enclave-engine", daemon=True)
        self._thread.start()

    # ---- public API --------------------------------------------------------------------

    def generate(self, requests: list[Request]) -> list[Completion]:
        """Run ``requests`` together; return their completions in the same order.
        Raises ValueError (before anything runs) if any request is invalid."""
        prepared = [self._prepare(r) for r in requests]
        sinks = [queue.SimpleQueue() for _ in prepared]
        if self._closed.is_set():
            raise RuntimeError("the engine is closed")
        # One message: the scheduler thread admits them all in the same step, so the same
        # requests are always batched the same way (seeded runs are reproducible).
        self._inbox.put(
            (
                "add_many",
                [(r, ids, q.put) for (r, ids), q in zip(prepared, sinks, strict=True)],
            )
        )
        out = []
        for (request, _), q in zip(prepared, sinks, strict=True):
            out.append(_collect(request.request_id, _drain(q)))
        return out

    def stream(self, request: Request) -> Iterator[Delta]:
        """Deltas of one request as they are produced. Closing the iterator early cancels
        the request. Raises ValueError at once for an invalid request."""
        request, ids = self._prepare(request)
        q: queue.SimpleQueue = queue.SimpleQueue()
        self._submit(request, ids, q.put)
        return self._iterate(request.request_id, q)

    def _iterate(self, request_id: str, q: queue.SimpleQueue) -> Iterator[Delta]:
        done = False
        try:
            for delta in _drain(q):
                done = delta.finish_reason is not None
                yield delta
        finally:
            if not done:
                self.cancel(request_id)

    async def astream(self, request: Request) -> AsyncIterator[Delta]:
        """``stream`` for asyncio: deltas arrive through the running loop without blocking
        it. Cancelling the consuming task or closing the generator cancels the request."""
        request, ids = self._prepare(request)
        loop = asyncio.get_running_loop()
        aq: asyncio.Queue = asyncio.Queue()

        def sink(item) -> None:
            loop.call_soon_threadsafe(aq.put_nowait, item)

        self._submit(request, ids, sink)
        done = False
        try:
            while not done:
                item = await aq.get()
                if isinstance(item, BaseException):
                    raise item
                done = item.finish_reason is not None
                yield item
        finally:
            if not done:
                self.cancel(request.request_id)

    def cancel(self, request_id: str) -> None:
        """Stop a request; its stream ends with finish_reason "cancelled". Unknown or
        finished ids are ignored."""
        self._inbox.put(("cancel", request_id))

    def warm_up(self, max_rows: int = 16) -> float:
        """Measure the linear kernels of decode-sized batches (1, 2, 4, ... ``max_rows`` rows)
        for every linear shape of the model now, so the first requests of each batch size
        do not pay for it (the measured dispatches of ``inference.fp8`` and
        ``inference.cpu_linear`` time each candidate on first use, with cold caches at these
        sizes). Call it before submitting requests. Returns the seconds it took."""
        from inference.cpu_linear import DispatchLinear
        from inference.fp8 import FP8Linear

        start = time.perf_counter()
        g = torch.Generator(device="cpu").manual_seed(0)
        seen = set()
        with torch.inference_mode():
            for module in self.model.modules():
                if not isinstance(module, (DispatchLinear, FP8Linear)):
                    continue
                shape = (type(module), module.out_features, module.in_features)
                if shape in seen:
                    continue
                seen.add(shape)
                rows = 1
                while rows <= max_rows:
                    x = torch.randn(
                        rows, module.in_features, generator=g, dtype=self.model.compute_dtype
                    )
                    module(x.to(module.weight.device))
                    rows *= 2
        return time.perf_counter() - start

    def close(self) -> None:
        """Stop the scheduler thread; pending requests end "cancelled"."""
        self._closed.set()
        self._inbox.put(("wake", None))
        self._thread.join(timeout=30)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def register_adapter(self, name: str, config: dict, tensors: dict[str, torch.Tensor]) -> str:
        """Install (or replace) the in-memory LoRA adapter ``name``: ``config`` is PEFT's
        adapter config as a dict, ``tensors`` its state dict (PEFT key names, as
        ``peft.get_peft_model_state_dict`` gives them). The tensors are copied, so the caller
        may go on training its own. Returns the ``Request.adapter`` value, ``memory:<name>``.
        Requests already submitted keep the weights they started with; the prefix cache
        never mixes versions. Raises ValueError for tensors that do not fit the model."""
        return self.adapters.register(name, config, tensors)

    def unregister_adapter(self, name: str) -> None:
        """Forget an in-memory adapter; requests already submitted finish with it."""
        self.adapters.unregister(name)

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError(f"{self.model_path} has no tokenizer.json: give prompt_token_ids")
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    # ---- validation (caller's thread) --------------------------------------------------

    def _prepare(self, request: Request) -> tuple[Request, list[int]]:
        if not isinstance(request, Request):
            raise ValueError(f"expected a Request, got {type(request).__name__}")
        given = [
            x is not None for x in (request.prompt, request.messages, request.prompt_token_ids)
        ]
        if sum(given) != 1:
            raise ValueError("give exactly one of prompt, messages or prompt_token_ids")
        params = request.sampling
        if not isinstance(params, SamplingParams):
            raise ValueError("sampling must be a SamplingParams")
        params.validate()
        if params.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {params.max_tokens}")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        in_memory = request.adapter is not None and request.adapter.startswith(MEMORY_PREFIX)
        if in_memory:
            if not self.adapters.is_registered(request.adapter):
                raise ValueError(f"adapter {request.adapter} is not registered with this engine")
        elif request.adapter is not None:
            request = dataclasses.replace(request, adapter=str(check_adapter_dir(request.adapter)))
        if request.prompt_token_ids is not None:
            ids = list(request.prompt_token_ids)
            bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < self.config.vocab_size]
            if bad:
                raise ValueError(f"prompt_token_ids holds ids outside the vocabulary: {bad[:5]}")
        elif request.messages is not None:
            template = self.chat_template
            if request.adapter is not None and not in_memory:
                template = load_chat_template(request.adapter) or template
            text = apply_chat_template(
                request.messages,
                add_generation_prompt=True,
                template=template,
                **self.special_tokens,
            )
            ids = self.encode(text)
        else:
            if not isinstance(request.prompt, str):
                raise ValueError("prompt must be a string")
            ids = self.encode(request.prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        limit = self.config.max_position_embeddings
        if len(ids) >= limit:
            raise ValueError(
                f"the prompt has {len(ids)} tokens; the model's context is {limit} "
                "(and one token must remain to generate)"
            )
        if self.cache.blocks_for(len(ids) + 1) > self.cache.num_blocks:
            raise ValueError(
                f"the prompt has {len(ids)} tokens; the KV cache holds only "
                f"{self.cache.num_blocks * self.cache.block_size}"
            )
        if request.request_id in self._seqs:
            raise ValueError(f"request_id {request.request_id!r} is already running")
        return request, ids

    def _submit(self, request: Request, ids: list[int], sink) -> None:
        if self._closed.is_set():
            raise RuntimeError("the engine is closed")
        self._inbox.put(("add", (request, ids, sink)))

    # ---- the scheduler thread ----------------------------------------------------------

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                block = not self.scheduler.has_work()
                try:
                    while True:
                        kind, payload = self._inbox.get(block=block)
                        block = False
                        self._handle(kind, payload)
                except queue.Empty:
                    pass
                if self._closed.is_set():
                    for seq in list(self._seqs.values()):
                        self._finish(seq, "cancelled")
                    return
                if self.scheduler.has_work():
                    try:
                        self._step()
                    except Exception as e:  # report to every caller, keep serving
                        for seq in list(self._seqs.values()):
                            self._emit(seq.state, e)
                            self.scheduler.remove(seq)
                            self.adapters.unref(seq.adapter_path)
                            del self._seqs[seq.request_id]

    def _handle(self, kind: str, payload) -> None:
        if kind == "add_many":
            for item in payload:
                self._handle("add", item)
        elif kind == "add":
            request, ids, sink = payload
            detok = IncrementalDetokenizer(self.tokenizer) if self.tokenizer else None
            state = _State(request, sink, detok)
            if request.request_id in self._seqs:
                self._emit(
                    state, ValueError(f"request_id {request.request_id!r} is already running")
                )
                return
            try:
                # An in-memory adapter's current version, held until the request ends.
                adapter_path = self.adapters.resolve(request.adapter) if request.adapter else None
            except ValueError as e:  # unregistered since the request was checked
                self._emit(state, e)
                return
            seq = Sequence(
                request_id=request.request_id,
                prompt_ids=ids,
                max_tokens=request.sampling.max_tokens,
                adapter_path=adapter_path,
            )
            seq.state = state
            seq.state.prompt_tensor = torch.tensor(ids, dtype=torch.int64)
            self._seqs[seq.request_id] = seq
            self.scheduler.add(seq)
        elif kind == "cancel":
            seq = self._seqs.get(payload)
            if seq is not None:
                self._finish(seq, "cancelled")

    def _step(self) -> None:
        plan = self.scheduler.schedule()
        for seq in plan.out_of_memory:
            self._finish(seq, "length")
        if not plan.chunks:
            return
        chunks = []
        for seq, n in plan.chunks:
            start = seq.num_computed
            chunks.append(
                Chunk(
                    tokens=seq.tokens[start : start + n],
                    start=start,
                    block_table=seq.block_table,
                    adapter=seq.adapter,
                    logits=start + n == seq.num_tokens,
                )
            )
        logits = self.runner.step(chunks)
        self.steps += 1
        row = 0
        for (seq, n), chunk in zip(plan.chunks, chunks, strict=True):
            self.scheduler.advance(seq, n)
            if not chunk.logits:
                continue
            self._on_token(seq, logits[row])
            row += 1

    def _on_token(self, seq: Sequence, logits: torch.Tensor) -> None:
        st: _State = seq.state
        p = st.params
        penalised = p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty
        out = torch.tensor(seq.output_ids, dtype=torch.int64) if penalised else _NO_IDS
        token, info = sample(logits, p, st.generator, st.prompt_tensor, out)
        seq.output_ids.append(token)
        st.pending_ids.append(token)
        if info is not None:
            st.pending_logprobs.append(info)
        finish = None
        if token in p.stop_token_ids or (token in self.eos_ids and not p.ignore_eos):
            finish = "stop"
        if st.detok is not None:
            st.text += st.detok.add(token)
            if finish is None and p.stop:
                cut = _find_stop(st.text, p.stop, st.sent)
                if cut is not None:
                    st.text, st.cut = st.text[:cut], True
                    finish = "stop"
        if finish is None and (
            len(seq.output_ids) >= seq.max_tokens
            or seq.num_tokens >= self.config.max_position_embeddings
        ):
            finish = "length"
        if finish is not None:
            self._finish(seq, finish)
            return
        # Hold back text that could still become a stop string.
        hold = max((len(s) - 1 for s in p.stop), default=0)
        upto = max(st.sent, len(st.text) - hold)
        self._emit_delta(seq, upto, None)

    def _emit_delta(self, seq: Sequence, upto: int, finish: str | None) -> None:
        st: _State = seq.state
        text = st.text[st.sent : upto]
        if not text and not st.pending_ids and finish is None:
            return
        st.sent = max(st.sent, upto)
        usage = None
        if finish is not None:
            usage = Usage(len(seq.prompt_ids), len(seq.output_ids))
        delta = Delta(
            request_id=seq.request_id,
            text=text,
            token_ids=st.pending_ids,
            logprobs=st.pending_logprobs if st.params.logprobs or st.params.top_logprobs else None,
            finish_reason=finish,
            usage=usage,
        )
        st.pending_ids, st.pending_logprobs = [], []
        self._emit(st, delta)

    def _emit(self, st: _State, item) -> None:
        try:
            st.sink(item)
        except RuntimeError:  # the caller's event loop is gone
            self._inbox.put(("cancel", st.request.request_id))

    def _finish(self, seq: Sequence, reason: str) -> None:
        st: _State = seq.state
        # A stop string already cut the text; otherwise release what the detokeniser held.
        if st.detok is not None and not st.cut:
            st.text += st.detok.flush()
        self.scheduler.remove(seq)
        if self._seqs.pop(seq.request_id, None) is not None:
            self.adapters.unref(seq.adapter_path)
        self._emit_delta(seq, len(st.text), reason)


_NO_IDS = torch.empty(0, dtype=torch.int64)  # output ids, where no penalty reads them


def _find_stop(text: str, stops: list[str], sent: int) -> int | None:
    """Index where the earliest stop string starts in ``text`` (searching only where a new
    match can be: from just before what was already sent), or None."""
    start = max(0, sent - max(len(s) for s in stops))
    hits = [i for i in (text.find(s, start) for s in stops) if i != -1]
    return min(hits) if hits else None


def _drain(q: queue.SimpleQueue) -> Iterator[Delta]:
    while True:
        item = q.get()
        if isinstance(item, BaseException):
            raise item
        yield item
        if item.finish_reason is not None:
            return


def _collect(request_id: str, deltas: Iterator[Delta]) -> Completion:
    text, ids, logprobs, last = [], [], [], None
    for d in deltas:
        text.append(d.text)
        ids += d.token_ids
        if d.logprobs is not None:
            logprobs += d.logprobs
        last = d
    return Completion(
        request_id=request_id,
        text="".join(text),
        token_ids=ids,
        finish_reason=last.finish_reason,
        usage=last.usage,
        logprobs=logprobs if last is not None and last.logprobs is not None else None,
    )
