"""Continuous batching: which sequences run in the next step, and with how many tokens.

Every step has a token budget (``max_batch_tokens``). It is spent in this order:

1. Every running sequence that is decoding gets its one token. If its block table must
   grow and no block is free, the most recently admitted running sequence is preempted:
   its blocks are released and it goes back to the front of the queue, to be recomputed
   from its prompt plus what it already generated (vLLM's recompute preemption). Requests
   are never failed for lack of memory; a sequence that alone fills the cache finishes
   with "length".
2. Sequences still reading their prompt continue with the next chunk (chunked prefill, as
   in Sarathi-Serve, Agrawal et al., 2024, arXiv:2403.02310): a long prompt advances by at
   most the budget left per step, so decoding sequences keep their pace.
3. Waiting sequences are admitted first come, first served while there is budget, free
   blocks for their whole prompt (prefix-cache hits are free) and an adapter slot. One
   exception: a sequence whose every full prompt block is being computed right now by
   another sequence's prefill (the same prompt sampled n times, as GRPO's groups are)
   waits for that prefill to publish its blocks, and then takes them from the prefix
   cache instead of computing the same prompt again in the same step.

The scheduler owns the bookkeeping of ``PagedLatentCache`` and of adapter pins; it runs
on the engine's one scheduler thread, so it takes no locks.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from inference.kv_cache import PagedLatentCache
from inference.lora import AdapterCache, LoRAAdapter


@dataclass(eq=False)  # identity: the queues test membership, field-wise == would compare lists
class Sequence:
    """A request being served: its tokens, cache blocks and progress."""

    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    adapter_path: str | None = None
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # leading tokens whose latents are in the cache
    block_table: list[int] = field(default_factory=list)
    n_registered: int = 0  # leading full blocks already published to the prefix cache
    adapter: LoRAAdapter | None = None
    num_preemptions: int = 0
    state: Any = None  # the engine's per-request data (sampler, detokeniser, sink)

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def adapter_key(self) -> str | None:
        return self.adapter_path


@dataclass
class Plan:
    """One step: (sequence, number of new tokens) in order, plus what else happened."""

    chunks: list[tuple[Sequence, int]]
    preempted: list[Sequence]
    out_of_memory: list[Sequence]  # finished with "length": alone, it cannot grow


class Scheduler:
    """Waiting queue, running set and the per-step plan (see module doc)."""

    def __init__(
        self,
        cache: PagedLatentCache,
        adapters: AdapterCache | None,
        max_batch_tokens: int,
        max_num_seqs: int = 256,
    ):
        if max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
        self.cache, self.adapters = cache, adapters
        self.max_batch_tokens = max_batch_tokens
        self.max_num_seqs = max(1, min(max_num_seqs, max_batch_tokens))
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.total_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Forget a finished or cancelled sequence, releasing its blocks and adapter."""
        if seq in self.running:
            self.running.remove(seq)
            self._release(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def _release(self, seq: Sequence) -> None:
        self.cache.free(seq.block_table)
        seq.block_table, seq.num_computed, seq.n_registered = [], 0, 0
        if seq.adapter is not None and self.adapters is not None:
            self.adapters.release(seq.adapter)
        seq.adapter = None

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.num_preemptions += 1
        self.total_preemptions += 1
        self.waiting.appendleft(seq)

    def schedule(self) -> Plan:
        plan = Plan([], [], [])
        budget = self.max_batch_tokens
        # 1. decodes, growing block tables (preempting the newest when out of blocks)
        for seq in list(self.running):
            if seq not in self.running or seq.num_computed != seq.num_tokens - 1:
                continue
            while not self.cache.ensure_capacity(seq.block_table, seq.num_tokens):
                if len(self.running) == 1:
                    self.running.remove(seq)
                    self._release(seq)
                    plan.out_of_memory.append(seq)
                    break
                victim = self.running[-1]
                self._preempt(victim)
                plan.preempted.append(victim)
                if victim is seq:
                    break
            else:
                if budget > 0:
                    plan.chunks.append((seq, 1))
                    budget -= 1
        # 2. prefills under way
        for seq in self.running:
            left = seq.num_tokens - seq.num_computed
            if left > 1:
                if budget <= 0:
                    break
                n = min(left, budget)
                plan.chunks.append((seq, n))
                budget -= n
        # 3. admissions
        in_flight = set()  # prefix hashes of the full blocks prefills are computing now
        for seq in self.running:
            if seq.num_computed < seq.num_tokens - 1:
                in_flight.update(self._full_block_hashes(seq))
        for seq in list(self.waiting):
            if budget <= 0 or len(self.running) >= self.max_num_seqs:
                break
            hashes = self._full_block_hashes(seq)
            if hashes and hashes[-1] in in_flight:
                continue  # its whole cacheable prompt is being computed: take it next step
            if seq.adapter_path is not None and seq.adapter is None:
                seq.adapter = self.adapters.acquire(seq.adapter_path)
                if seq.adapter is None:
                    break  # every adapter slot is held by running requests
            # A small reserve keeps running sequences able to grow after an admission.
            reserve = 1 if self.running else 0
            got = self.cache.allocate(seq.tokens, seq.adapter_key, reserve=reserve)
            if got is None:
                if (
                    not self.running
                    and self.cache.blocks_for(seq.num_tokens) > self.cache.num_blocks
                ):
                    self.waiting.remove(seq)
                    plan.out_of_memory.append(seq)
                    if seq.adapter is not None:
                        self.adapters.release(seq.adapter)
                        seq.adapter = None
                    continue
                if seq.adapter is not None:
                    self.adapters.release(seq.adapter)
                    seq.adapter = None
                break
            self.waiting.remove(seq)
            in_flight.update(hashes)
            seq.block_table, seq.num_computed = got
            seq.n_registered = seq.num_computed // self.cache.block_size
            self.running.append(seq)
            n = min(seq.num_tokens - seq.num_computed, budget)
            plan.chunks.append((seq, n))
            budget -= n
        return plan

    def _full_block_hashes(self, seq: Sequence) -> list[int]:
        """The prefix-cache names of the blocks ``seq``'s prefill would publish or reuse."""
        n = (seq.num_tokens - 1) // self.cache.block_size
        return list(self.cache.prefix_hashes(seq.tokens, seq.adapter_key, n))

    def advance(self, seq: Sequence, n: int) -> None:
        """Record that ``n`` more tokens of ``seq`` are in the cache; publish full blocks."""
        seq.num_computed += n
        seq.n_registered = self.cache.commit_full_blocks(
            seq.block_table, seq.tokens, seq.num_computed, seq.adapter_key, seq.n_registered
        )
