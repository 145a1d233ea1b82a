"""A paged cache of MLA latents, with prefix sharing.

Per token and layer MLA needs only the normalised KV latent ``c_kv`` (kv_lora_rank values)
and the shared, already-rotated RoPE key (qk_rope_head_dim values): decode absorbs the
key and value up-projections into the query and the output (see ``inference/decode.py``),
so nothing per head is ever stored. This module keeps those ``kv_lora_rank +
qk_rope_head_dim`` values in one preallocated pool cut into fixed-size blocks, as vLLM's
PagedAttention does (Kwon et al., 2023, arXiv:2309.06180):

- ``pool[layer, slot]`` with ``slot = block * block_size + offset``; a sequence owns a
  *block table* (a list of block ids), so memory is reserved a block at a time and no
  sequence needs a contiguous region.
- Full blocks are content-addressed: the hash of the adapter and the whole token prefix up
  to the block's end names it. A new sequence whose prompt starts with a cached prefix
  takes those blocks (refcount + 1) instead of recomputing them. Freed blocks keep their
  hash until they are reused, so a prefix stays warm after its request ends.

The cache knows nothing of requests or scheduling; ``inference/scheduler.py`` decides who
gets blocks and whom to preempt when none are free.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch


def latent_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Cache bytes one token costs over all layers: layers * (kv_lora_rank + rope dim) * size."""
    width = config.kv_lora_rank + config.qk_rope_head_dim
    return config.num_hidden_layers * width * torch.empty((), dtype=dtype).element_size()


class PagedLatentCache:
    """Block pool for MLA latents. ``pool`` is ``[layers, num_blocks * block_size, width]``.

    Construct with either ``num_blocks`` or ``kv_cache_bytes`` (the pool gets as many whole
    blocks as fit). Raises ValueError if not even one block fits.

    Block bookkeeping (not thread-safe: one scheduler thread owns it):
        allocate(tokens, adapter_key) -> (block_table, cached_tokens) or None when full
        ensure_capacity(block_table, n_tokens) -> bool (False: no free block)
        free(block_table)
        commit_full_blocks(table, tokens, n_computed, adapter_key, n_registered) -> new count
    """

    def __init__(
        self,
        num_layers: int,
        width: int,
        *,
        block_size: int = 16,
        num_blocks: int | None = None,
        kv_cache_bytes: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ):
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        elem = torch.empty((), dtype=dtype).element_size()
        self.bytes_per_block = num_layers * block_size * width * elem
        if num_blocks is None:
            if kv_cache_bytes is None:
                raise ValueError("give num_blocks or kv_cache_bytes")
            num_blocks = int(kv_cache_bytes) // self.bytes_per_block
        if num_blocks <= 0:
            raise ValueError(
                f"kv cache holds no block: one block of {block_size} tokens needs "
                f"{self.bytes_per_block} bytes"
            )
        self.num_layers, self.width, self.block_size = num_layers, width, block_size
        self.num_blocks = num_blocks
        self.pool = torch.zeros(
            num_layers, num_blocks * block_size, width, dtype=dtype, device=device
        )
        self.refcount = [0] * num_blocks
        # Free blocks in reuse order: unhashed ones first, then hashed ones oldest first, so a
        # recently used prefix survives longest.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._hash_of: dict[int, int] = {}
        self._block_of: dict[int, int] = {}
        # Counters for benchmarks and metrics: prompt tokens served from cached blocks, and
        # the most blocks held at once since the last ``reset_peak()``.
        self.prefix_hit_tokens = 0
        self.peak_blocks_in_use = 0

    # ---- queries -----------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def blocks_in_use(self) -> int:
        return self.num_blocks - len(self._free)

    def reset_peak(self) -> None:
        self.peak_blocks_in_use = self.blocks_in_use

    def _note_usage(self) -> None:
        self.peak_blocks_in_use = max(self.peak_blocks_in_use, self.blocks_in_use)

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def slots(self, block_table: Sequence[int], start: int, end: int) -> list[int]:
        """Flat pool slots of token positions ``start..end-1`` of a sequence."""
        bs = self.block_size
        return [block_table[p // bs] * bs + p % bs for p in range(start, end)]

    def slot_tensor(self, block_table: Sequence[int], length: int) -> torch.Tensor:
        """Slots of positions ``0..length-1`` as an int64 tensor on the pool's device."""
        bs = self.block_size
        blocks = torch.tensor(block_table[: self.blocks_for(length)], dtype=torch.int64)
        slots = (blocks[:, None] * bs + torch.arange(bs)).flatten()[:length]
        return slots.to(self.pool.device)

    # ---- block life cycle --------------------------------------------------------------

    def _take_free(self) -> int:
        block, _ = self._free.popitem(last=False)
        old = self._hash_of.pop(block, None)
        if old is not None:
            del self._block_of[old]
        self.refcount[block] = 1
        return block

    def prefix_hashes(self, tokens: Sequence[int], adapter_key: object, n_blocks: int):
        h = hash(("enclave-latent", adapter_key))
        bs = self.block_size
        for i in range(n_blocks):
            h = hash((h, tuple(tokens[i * bs : (i + 1) * bs])))
            yield h

    def allocate(
        self, tokens: Sequence[int], adapter_key: object = None, reserve: int = 0
    ) -> tuple[list[int], int] | None:
        """Blocks for a new sequence of ``tokens``: cached full-block prefix hits first, then
        fresh blocks for the rest. ``reserve`` extra free blocks must remain afterwards (a
        watermark so running sequences can still grow).

        Returns (block_table, number of leading tokens already in the cache), or None (and
        changes nothing) when the free blocks do not suffice. At least one token is left
        to compute, so the caller always gets logits for the last prompt token.
        """
        need = self.blocks_for(len(tokens))
        # The block holding the last token is never taken from the cache (it is recomputed).
        max_hits = (len(tokens) - 1) // self.block_size
        hits: list[int] = []
        for h in self.prefix_hashes(tokens, adapter_key, max_hits):
            block = self._block_of.get(h)
            if block is None:
                break
            hits.append(block)
        revived = sum(1 for b in hits if self.refcount[b] == 0)
        fresh = need - len(hits)
        if fresh + revived + reserve > len(self._free):
            return None
        for b in hits:
            if self.refcount[b] == 0:
                del self._free[b]
            self.refcount[b] += 1
        table = hits + [self._take_free() for _ in range(fresh)]
        self.prefix_hit_tokens += len(hits) * self.block_size
        self._note_usage()
        return table, len(hits) * self.block_size

    def ensure_capacity(self, block_table: list[int], n_tokens: int) -> bool:
        """Grow ``block_table`` in place to hold ``n_tokens``; False (unchanged) if no block."""
        need = self.blocks_for(n_tokens) - len(block_table)
        if need > len(self._free):
            return False
        block_table.extend(self._take_free() for _ in range(max(need, 0)))
        self._note_usage()
        return True

    def free(self, block_table: Sequence[int]) -> None:
        """Drop one reference to each block; unreferenced blocks return to the free list
        (hashed ones stay findable until reused)."""
        for b in block_table:
            self.refcount[b] -= 1
            if self.refcount[b] == 0:
                self._free[b] = None
                if b not in self._hash_of:
                    self._free.move_to_end(b, last=False)

    def commit_full_blocks(
        self,
        block_table: Sequence[int],
        tokens: Sequence[int],
        n_computed: int,
        adapter_key: object,
        n_registered: int,
    ) -> int:
        """Make the fully computed blocks of a sequence findable by prefix hash.

        ``n_registered`` blocks were handled before; returns the new count. A block whose
        hash already names another block stays private (two sequences computed the same
        prefix at once; the first one wins).
        """
        n_full = n_computed // self.block_size
        if n_full <= n_registered:
            return n_registered
        for i, h in enumerate(self.prefix_hashes(tokens, adapter_key, n_full)):
            if i < n_registered:
                continue
            b = block_table[i]
            if h not in self._block_of and b not in self._hash_of:
                self._block_of[h] = b
                self._hash_of[b] = h
        return n_full

    # ---- data --------------------------------------------------------------------------

    def write(self, layer: int, slots: torch.Tensor, values: torch.Tensor) -> None:
        """Store ``values`` [N, width] at flat ``slots`` [N] of ``layer``."""
        self.pool[layer].index_copy_(0, slots, values.to(self.pool.dtype))

    def read(self, layer: int, slots: torch.Tensor) -> torch.Tensor:
        """Gather entries of ``layer`` at ``slots`` (any shape) -> [*slots.shape, width]."""
        return self.pool[layer][slots]
