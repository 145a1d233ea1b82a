"""Secure aggregation: the server learns the sum of the members' vectors and nothing else.

After Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine
Learning" (CCS 2017), the honest-but-curious variant (Sec. 4, Fig. 4 without the
signatures of the consistency-check round). Flower ships SecAgg+ only on its legacy stack
and seeds its masks from a 32-bit Mersenne Twister, so we write our own here; every
primitive comes from `cryptography` (X25519, HKDF-SHA256, ChaCha20, ChaCha20-Poly1305).
Only Shamir sharing is ours, because `cryptography` has none.

One round runs in four message exchanges; each stage takes and returns plain bytes, dicts
keyed by ``str(client_id)`` and numpy arrays, so Flower ConfigRecords/ArrayRecords carry
them unchanged::

    server = SecAggServer(round_id, threshold, vector_len, fixed_point)
    client = SecAggClient(client_id, round_id, threshold, fixed_point)

    1 advertise   client.advertise_keys() -> {"enc_pk", "mask_pk"}
                  server.receive_advertisement(cid, msg); roster = server.close_advertise()
    2 share keys  client.share_keys(roster) -> {str(peer): ciphertext}
                  server.receive_shares(cid, msg); inboxes = server.close_share_keys()
    3 masked in   client.masked_input(vector, inboxes[cid]) -> uint array
                  server.receive_masked_input(cid, arr); request = server.close_masked_input()
    4 unmask      client.unmask(request) -> {"b/<id>": share, "s/<id>": share}
                  server.receive_unmask(cid, msg); total = server.finalize()

Who can drop where: a member missing at any stage is left out from then on. Members that
shared keys but sent no masked input ("dropped") have their pairwise masks removed by
reconstructing their mask private key from t shares; members whose masked input arrived
("survivors") have their self mask removed by reconstructing their seed b_u. A client
reveals, per round, exactly one of the two for each peer, and only once (Sec. 4, "never
both"), so the server can never strip both masks off one member's input.

Threat model and what is weaker than the paper: the server is honest-but-curious about
the protocol messages; there is no PKI binding X25519 keys to members, so a server that
invents members (Sybils) or shows members different rosters is out of scope (the
paper's active-adversary variant needs signatures over keys and over the survivor set).
Threshold t > n/2 is recommended (`default_threshold`).
"""

from __future__ import annotations

import enum
import hashlib
import secrets
import struct
import time
from dataclasses import dataclass, field

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

PROTOCOL = b"enclave-secagg-v1"
MAX_CLIENT_ID = 2**64 - 1  # Flower node ids are uint64

# Shamir field: the Mersenne prime 2^521 - 1, so a 32-byte secret (an X25519 private key or a
# 256-bit seed) is one field element and needs no splitting.
SHAMIR_PRIME = 2**521 - 1
SHARE_BYTES = 66  # ceil(521 / 8)

# Mask streams are cut into chunks of this many elements; each chunk has its own ChaCha20
# nonce (the chunk index), so no (key, nonce, counter) is ever reused within 2^32 blocks.
MASK_CHUNK = 1 << 20


class SecAggError(Exception):
    """A protocol message is malformed, out of order or failed authentication."""


class SecAggAborted(SecAggError):
    """The round cannot finish safely (too few members left); no sum is produced."""


def default_threshold(n_clients: int) -> int:
    """The recommended Shamir threshold for ``n_clients`` members: a strict majority."""
    return n_clients // 2 + 1


# --------------------------------------------------------------------------------------
# Fixed point
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FixedPoint:
    """Fixed-point encoding of floats as integers mod 2^bits (two's complement).

    A value x is clipped to [-clip, clip] and encoded as round(x * 2^frac_bits) mod 2^bits.
    Sums of n encodings decode exactly (up to rounding, <= n * 2^-(frac_bits+1) per
    coordinate) as long as n * clip * 2^frac_bits < 2^(bits-1): then the true sum is inside
    the signed range and the modular sum never wraps. `for_sum` picks the finest frac_bits
    that guarantees this for a given number of members.

    Why 2^32 or 2^64 rather than a prime: numpy's unsigned arithmetic wraps mod 2^bits for
    free, and the ChaCha20 keystream read as uint32/uint64 is exactly uniform mod 2^bits, so
    masks need no rejection sampling. bits=32 matches float32 bandwidth and gives ~2^-24
    resolution for 100 members with clip 1; bits=64 leaves head-room for large federations.

    With DP noise (federated.privacy) the clip must cover the noised values too, e.g.
    clip >= max|update coordinate| + 6 * noise std, or the clipping biases the noise.
    """

    clip: float
    frac_bits: int
    bits: int = 32

    def __post_init__(self) -> None:
        if self.bits not in (32, 64):
            raise ValueError("bits must be 32 or 64")
        if not (self.clip > 0 and np.isfinite(self.clip)):
            raise ValueError("clip must be a positive finite number")
        if not 0 <= self.frac_bits < self.bits - 1:
            raise ValueError("frac_bits out of range")
        if self.clip * 2.0**self.frac_bits >= 2.0 ** (self.bits - 1):
            raise ValueError("clip * 2^frac_bits does not fit in the signed range")

    @classmethod
    def for_sum(cls, clip: float, max_clients: int, bits: int = 32) -> FixedPoint:
        """The finest encoding whose sum over ``max_clients`` members can never wrap."""
        if max_clients < 1:
            raise ValueError("max_clients must be >= 1")
        headroom = (2.0 ** (bits - 1) - 1) / (max_clients * clip)
        frac_bits = int(np.floor(np.log2(headroom)))
        if frac_bits < 0:
            raise ValueError("clip * max_clients does not fit in 2^(bits-1)")
        return cls(clip=clip, frac_bits=min(frac_bits, bits - 2), bits=bits)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint32 if self.bits == 32 else np.uint64)

    @property
    def scale(self) -> float:
        return float(2**self.frac_bits)

    def max_clients(self) -> int:
        """How many members may be summed before the sum could wrap."""
        return int((2.0 ** (self.bits - 1) - 1) // (self.clip * self.scale))

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """Clip and encode a float vector; NaN/inf raise ValueError (they cannot be clipped)."""
        x = np.asarray(x, dtype=np.float64)
        if not np.all(np.isfinite(x)):
            raise ValueError("vector contains NaN or inf")
        q = np.rint(np.clip(x, -self.clip, self.clip) * self.scale).astype(np.int64)
        return q.astype(self.dtype)  # two's complement wrap into [0, 2^bits)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        """Decode a (summed) encoding back to floats."""
        signed = np.asarray(q, dtype=self.dtype).view(np.int32 if self.bits == 32 else np.int64)
        return signed.astype(np.float64) / self.scale


# --------------------------------------------------------------------------------------
# Primitives
# --------------------------------------------------------------------------------------


def _ids(*ids: int) -> bytes:
    return b"".join(struct.pack(">Q", i) for i in ids)


def _label(round_id: str, purpose: bytes, *ids: int) -> bytes:
    # Every derived key is bound to the protocol, the purpose and the round (length-prefixed
    # so no two (round, purpose) pairs collide): a mask from round r is useless in round r+1.
    rid = round_id.encode()
    return PROTOCOL + b"|" + purpose + b"|" + struct.pack(">I", len(rid)) + rid + _ids(*ids)


def _hkdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def mask_stream(seed: bytes, round_id: str, purpose: bytes, n: int, dtype: np.dtype) -> np.ndarray:
    """Expand a 32-byte seed into ``n`` uniform integers of ``dtype`` (uint32/uint64).

    The ChaCha20 key is HKDF(seed, info=protocol|purpose|round); each chunk of MASK_CHUNK
    elements uses nonce = chunk index with the block counter starting at 0.
    """
    key = _hkdf(seed, _label(round_id, b"mask-stream/" + purpose))
    dtype = np.dtype(dtype)
    out = np.empty(n, dtype=dtype)
    for chunk, start in enumerate(range(0, n, MASK_CHUNK)):
        stop = min(n, start + MASK_CHUNK)
        # cryptography's ChaCha20 nonce is 4-byte little-endian counter + 12-byte nonce.
        nonce = b"\0\0\0\0" + chunk.to_bytes(12, "big")
        enc = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()
        raw = enc.update(bytes((stop - start) * dtype.itemsize))
        out[start:stop] = np.frombuffer(raw, dtype=dtype.newbyteorder("<"))
    return out


def pairwise_seed(shared_secret: bytes, round_id: str, u: int, v: int) -> bytes:
    """The seed s_{u,v} both members (and, after a dropout, the server) derive for a pair."""
    return _hkdf(shared_secret, _label(round_id, b"pairwise-seed", min(u, v), max(u, v)))


def _share_key(shared_secret: bytes, round_id: str, sender: int, recipient: int) -> bytes:
    # Directional keys: u->v and v->u use different keys, so each key encrypts one message.
    return _hkdf(shared_secret, _label(round_id, b"share-enc", sender, recipient))


def _raw_private(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def _raw_public(key: X25519PrivateKey | X25519PublicKey) -> bytes:
    pub = key.public_key() if isinstance(key, X25519PrivateKey) else key
    return pub.public_bytes(Encoding.Raw, PublicFormat.Raw)


def _exchange(private: X25519PrivateKey, public: bytes) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as exc:  # low-order point: an all-zero shared secret
        raise SecAggError(f"invalid X25519 public key: {exc}") from exc


# --------------------------------------------------------------------------------------
# Shamir secret sharing over GF(2^521 - 1)
# --------------------------------------------------------------------------------------


def shamir_split(secret: bytes, threshold: int, xs: list[int]) -> dict[int, int]:
    """Split ``secret`` (<= 64 bytes) into shares at the nonzero points ``xs``.

    Returns {x: y}. Any ``threshold`` shares recover the secret; fewer reveal nothing
    (the t-1 random coefficients come from `secrets`). Raises ValueError on bad arguments.
    """
    if not 1 <= threshold <= len(xs):
        raise ValueError("need 1 <= threshold <= number of shares")
    if len(set(xs)) != len(xs) or any(not 0 < x < SHAMIR_PRIME for x in xs):
        raise ValueError("share points must be distinct and nonzero")
    s = int.from_bytes(secret, "big")
    if s >= SHAMIR_PRIME:
        raise ValueError("secret too large for the field")
    coeffs = [s] + [secrets.randbelow(SHAMIR_PRIME) for _ in range(threshold - 1)]
    shares = {}
    for x in xs:
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % SHAMIR_PRIME
        shares[x] = y
    return shares


def _interpolate_at_zero(points: list[tuple[int, int]]) -> int:
    total = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * xj % SHAMIR_PRIME
                den = den * (xj - xi) % SHAMIR_PRIME
        total = (total + yi * num * pow(den, -1, SHAMIR_PRIME)) % SHAMIR_PRIME
    return total


def shamir_combine(shares: dict[int, int], threshold: int, length: int = 32) -> bytes:
    """Recover a ``length``-byte secret from at least ``threshold`` shares {x: y}.

    With more than ``threshold`` shares it also recovers from a second subset and compares,
    so an inconsistent (corrupted) share is detected rather than yielding a wrong secret.
    Raises SecAggAborted with too few shares, SecAggError on inconsistency.
    """
    if len(shares) < threshold:
        raise SecAggAborted(f"{len(shares)} shares, threshold is {threshold}")
    points = sorted(shares.items())
    secret = _interpolate_at_zero(points[:threshold])
    if len(points) > threshold and _interpolate_at_zero(points[-threshold:]) != secret:
        raise SecAggError("inconsistent Shamir shares")
    if secret >= 256**length:
        raise SecAggError("reconstructed secret out of range")
    return secret.to_bytes(length, "big")


def _x(client_id: int) -> int:
    return client_id + 1  # Shamir points must be nonzero; ids are < 2^64 < p


# --------------------------------------------------------------------------------------
# Client
# --------------------------------------------------------------------------------------


class _Stage(enum.IntEnum):
    ADVERTISE = 0
    SHARE_KEYS = 1
    MASKED_INPUT = 2
    UNMASK = 3
    DONE = 4


def _check_id(client_id: int) -> int:
    if not isinstance(client_id, int) or not 0 <= client_id <= MAX_CLIENT_ID - 1:
        raise ValueError("client_id must be an int in [0, 2^64 - 2]")
    return client_id


def _parse_roster(roster: dict[str, bytes]) -> dict[int, tuple[bytes, bytes]]:
    parsed = {}
    for key, value in roster.items():
        cid = _check_id(int(key))
        if not isinstance(value, bytes | bytearray) or len(value) != 64:
            raise SecAggError(f"roster entry for {cid} is not 64 bytes")
        parsed[cid] = (bytes(value[:32]), bytes(value[32:]))
    return parsed


class SecAggClient:
    """One member's side of one secure-aggregation round.

    Args:
        client_id: this member's id (Flower node id, < 2^64 - 1).
        round_id: a string unique to this round of this federation, e.g.
            ``f"{federation_id}/{run_id}/{server_round}"``; it separates every key.
        threshold: the Shamir threshold t; the client refuses to go on with fewer than t
            members at any stage (SecAggAborted).
        fixed_point: the FixedPoint encoding all members and the server agree on.

    Keys (two X25519 pairs: c for encrypting shares, s for pairwise masks) and the
    self-mask seed b_u are fresh per instance: use one instance per round.
    Methods must be called in order; each may be called once. Errors: SecAggError for
    malformed or forged messages, SecAggAborted when too few members remain.
    """

    def __init__(self, client_id: int, round_id: str, threshold: int, fixed_point: FixedPoint):
        self.client_id = _check_id(client_id)
        if not isinstance(round_id, str) or not round_id:
            raise ValueError("round_id must be a non-empty string unique to the round")
        self.round_id = round_id
        if threshold < 2:
            raise ValueError("threshold must be >= 2")
        self.threshold = threshold
        self.fixed_point = fixed_point
        self._enc_key = X25519PrivateKey.generate()
        self._mask_key = X25519PrivateKey.generate()
        self._self_seed = secrets.token_bytes(32)
        self._stage = _Stage.ADVERTISE
        self._roster: dict[int, tuple[bytes, bytes]] = {}
        self._u2: set[int] = set()
        self._held: dict[int, tuple[int, int]] = {}  # peer -> (share of s_sk, share of b)

    def _advance(self, expected: _Stage) -> None:
        if self._stage != expected:
            raise SecAggError(f"stage {expected.name} called during {self._stage.name}")
        self._stage = _Stage(expected + 1)

    def advertise_keys(self) -> dict[str, bytes]:
        """Stage 1 (Fig. 4, Round 0): this member's two public keys."""
        self._advance(_Stage.ADVERTISE)
        return {"enc_pk": _raw_public(self._enc_key), "mask_pk": _raw_public(self._mask_key)}

    def share_keys(self, roster: dict[str, bytes]) -> dict[str, bytes]:
        """Stage 2 (Round 1): t-of-n shares of s_u^SK and b_u, encrypted to each peer.

        ``roster`` is the server's {str(id): enc_pk || mask_pk} for U1. Returns
        {str(peer): nonce || ChaCha20-Poly1305 ciphertext} for every peer in U1.
        """
        self._advance(_Stage.SHARE_KEYS)
        roster_p = _parse_roster(roster)
        if roster_p.get(self.client_id) != (
            _raw_public(self._enc_key),
            _raw_public(self._mask_key),
        ):
            raise SecAggError("the roster does not carry this member's keys")
        if len(roster_p) < self.threshold:
            raise SecAggAborted(
                f"{len(roster_p)} members advertised keys, threshold is {self.threshold}"
            )
        all_keys = [k for pair in roster_p.values() for k in pair]
        if len(set(all_keys)) != len(all_keys):
            raise SecAggError("duplicate public keys in roster")  # Fig. 4: keys must differ
        self._roster = roster_p
        xs = [_x(cid) for cid in roster_p]
        s_shares = shamir_split(_raw_private(self._mask_key), self.threshold, xs)
        b_shares = shamir_split(self._self_seed, self.threshold, xs)
        # Our own shares stay here (they count towards t at unmasking, as in the paper).
        me = _x(self.client_id)
        self._held[self.client_id] = (s_shares[me], b_shares[me])
        out = {}
        for peer, (enc_pk, _) in roster_p.items():
            if peer == self.client_id:
                continue
            key = _share_key(_exchange(self._enc_key, enc_pk), self.round_id, self.client_id, peer)
            plain = (
                _ids(self.client_id, peer)
                + s_shares[_x(peer)].to_bytes(SHARE_BYTES, "big")
                + b_shares[_x(peer)].to_bytes(SHARE_BYTES, "big")
            )
            nonce = secrets.token_bytes(12)
            aad = _label(self.round_id, b"share-aad", self.client_id, peer)
            out[str(peer)] = nonce + ChaCha20Poly1305(key).encrypt(nonce, plain, aad)
        return out

    def _open(self, sender: int, blob: bytes) -> tuple[int, int]:
        if sender not in self._roster or sender == self.client_id:
            raise SecAggError(f"share ciphertext from unknown member {sender}")
        key = _share_key(
            _exchange(self._enc_key, self._roster[sender][0]), self.round_id, sender, self.client_id
        )
        aad = _label(self.round_id, b"share-aad", sender, self.client_id)
        try:
            plain = ChaCha20Poly1305(key).decrypt(bytes(blob[:12]), bytes(blob[12:]), aad)
        except (InvalidTag, ValueError) as exc:
            raise SecAggError(f"share ciphertext from {sender} failed authentication") from exc
        if plain[:16] != _ids(sender, self.client_id) or len(plain) != 16 + 2 * SHARE_BYTES:
            raise SecAggError(f"share ciphertext from {sender} names the wrong members")
        s_share = int.from_bytes(plain[16 : 16 + SHARE_BYTES], "big")
        b_share = int.from_bytes(plain[16 + SHARE_BYTES :], "big")
        return s_share, b_share

    def masked_input(self, vector: np.ndarray, inbox: dict[str, bytes]) -> np.ndarray:
        """Stage 3 (Round 2): y_u = x_u + PRG(b_u) + sum_v +-PRG(s_{u,v}) mod 2^bits.

        ``vector`` is this member's float vector (already weighted if the federation weighs,
        see `weighted_payload`); it is clipped and quantised with ``fixed_point``.
        ``inbox`` is {str(sender): ciphertext} from every other member of U2; each is
        decrypted and authenticated now, so tampering is caught before anything is sent.
        Returns the masked vector (uint32/uint64), uniformly random to the server.
        """
        self._advance(_Stage.MASKED_INPUT)
        held = {}
        for key, blob in inbox.items():
            sender = int(key)
            held[sender] = self._open(sender, blob)
        self._u2 = set(held) | {self.client_id}
        if len(self._u2) < self.threshold:
            raise SecAggAborted(
                f"{len(self._u2)} members shared keys, threshold is {self.threshold}"
            )
        self._held.update(held)
        fp = self.fixed_point
        y = fp.quantize(np.asarray(vector).reshape(-1))
        n = y.shape[0]
        y += mask_stream(self._self_seed, self.round_id, b"self", n, fp.dtype)
        for peer in sorted(self._u2 - {self.client_id}):
            shared = _exchange(self._mask_key, self._roster[peer][1])
            mask = mask_stream(
                pairwise_seed(shared, self.round_id, self.client_id, peer),
                self.round_id,
                b"pairwise",
                n,
                fp.dtype,
            )
            # Sec. 3.2: the smaller id adds, the larger subtracts, so each pair cancels.
            if self.client_id < peer:
                y += mask
            else:
                y -= mask
        return y

    def unmask(self, request: dict) -> dict[str, bytes]:
        """Stage 4 (Round 4): reveal b-shares of survivors and s-shares of dropped members.

        ``request`` is {"survivors": [ids]} (U3) from the server. The client computes the
        dropped set itself (its own U2 minus U3), so it never reveals both shares of one
        member, and it answers only once per round. Raises SecAggAborted when fewer than t
        survivors remain (revealing anything then could expose an individual input).
        Returns {"b/<id>": share, "s/<id>": share} (66-byte big-endian field elements).
        """
        self._advance(_Stage.UNMASK)
        survivors = {int(v) for v in request["survivors"]}
        if self.client_id not in survivors:
            raise SecAggError("this member is not listed among the survivors")
        if not survivors <= self._u2:
            raise SecAggError("survivor list names members that never shared keys")
        if len(survivors) < self.threshold:
            raise SecAggAborted(f"{len(survivors)} survivors, threshold is {self.threshold}")
        out = {}
        for peer in sorted(self._u2):
            s_share, b_share = self._held[peer]
            if peer in survivors:
                out[f"b/{peer}"] = b_share.to_bytes(SHARE_BYTES, "big")
            else:
                out[f"s/{peer}"] = s_share.to_bytes(SHARE_BYTES, "big")
        return out


# --------------------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------------------


@dataclass
class SecAggServer:
    """The server's side of one round: routes messages, tracks who is left, unmasks the sum.

    Args:
        round_id: the same string the clients use.
        threshold: Shamir threshold t; below t members at any stage the round aborts.
        vector_len: length of every member's vector.
        fixed_point: the agreed FixedPoint encoding.

    Stage methods must be called in order (SecAggError otherwise). ``close_*`` freeze the
    member set of a stage and raise SecAggAborted below t; a member whose message is
    malformed is dropped from the round, never trusted. ``finalize`` returns the float sum
    over the survivors, or raises SecAggAborted; no partial sum is ever computed before
    all checks pass.
    """

    round_id: str
    threshold: int
    vector_len: int
    fixed_point: FixedPoint
    _stage: _Stage = field(default=_Stage.ADVERTISE, init=False)
    _keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict, init=False)
    _shares: dict[int, dict[str, bytes]] = field(default_factory=dict, init=False)
    _masked: dict[int, np.ndarray] = field(default_factory=dict, init=False)
    _unmask: dict[int, dict[str, bytes]] = field(default_factory=dict, init=False)
    u1: list[int] = field(default_factory=list, init=False)
    u2: list[int] = field(default_factory=list, init=False)
    u3: list[int] = field(default_factory=list, init=False)
    rejected: dict[int, str] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.round_id, str) or not self.round_id:
            raise ValueError("round_id must be a non-empty string unique to the round")
        if self.threshold < 2:
            raise ValueError("threshold must be >= 2")
        if self.vector_len < 1:
            raise ValueError("vector_len must be >= 1")

    def _require(self, stage: _Stage) -> None:
        if self._stage != stage:
            raise SecAggError(f"{stage.name} message during {self._stage.name}")

    def _need(self, members: list[int], what: str) -> None:
        if len(members) < self.threshold:
            self._stage = _Stage.DONE
            raise SecAggAborted(
                f"round {self.round_id}: only {len(members)} members {what}, "
                f"threshold is {self.threshold}"
            )

    def receive_advertisement(self, client_id: int, msg: dict[str, bytes]) -> None:
        """Stage 1: record a member's {"enc_pk", "mask_pk"} (32 bytes each)."""
        self._require(_Stage.ADVERTISE)
        cid = _check_id(client_id)
        enc, mask = bytes(msg.get("enc_pk", b"")), bytes(msg.get("mask_pk", b""))
        if len(enc) != 32 or len(mask) != 32 or cid in self._keys:
            self.rejected[cid] = "malformed or repeated key advertisement"
            self._keys.pop(cid, None)
            return
        self._keys[cid] = (enc, mask)

    def close_advertise(self) -> dict[str, bytes]:
        """End stage 1: U1 is fixed. Returns the roster {str(id): enc_pk || mask_pk}."""
        self._require(_Stage.ADVERTISE)
        self.u1 = sorted(self._keys)
        self._need(self.u1, "advertised keys")
        self._stage = _Stage.SHARE_KEYS
        return {str(c): self._keys[c][0] + self._keys[c][1] for c in self.u1}

    def receive_shares(self, client_id: int, msg: dict[str, bytes]) -> None:
        """Stage 2: a member's {str(peer): ciphertext}, one for every other member of U1."""
        self._require(_Stage.SHARE_KEYS)
        expected = {str(c) for c in self.u1 if c != client_id}
        if client_id not in self.u1 or set(msg) != expected or client_id in self._shares:
            self.rejected[client_id] = "share message does not cover exactly U1"
            self._shares.pop(client_id, None)
            return
        self._shares[client_id] = {k: bytes(v) for k, v in msg.items()}

    def close_share_keys(self) -> dict[int, dict[str, bytes]]:
        """End stage 2: U2 is fixed. Returns each member's inbox {recipient: {str(sender): ct}}."""
        self._require(_Stage.SHARE_KEYS)
        self.u2 = sorted(self._shares)
        self._need(self.u2, "shared keys")
        self._stage = _Stage.MASKED_INPUT
        return {r: {str(s): self._shares[s][str(r)] for s in self.u2 if s != r} for r in self.u2}

    def receive_masked_input(self, client_id: int, masked: np.ndarray) -> None:
        """Stage 3: a member's masked vector (fixed_point.dtype, length vector_len)."""
        self._require(_Stage.MASKED_INPUT)
        arr = np.asarray(masked)
        if (
            client_id not in self.u2
            or client_id in self._masked
            or arr.dtype != self.fixed_point.dtype
            or arr.shape != (self.vector_len,)
        ):
            self.rejected[client_id] = "masked input from a non-member, repeated or misshapen"
            self._masked.pop(client_id, None)
            return
        self._masked[client_id] = arr.copy()

    def close_masked_input(self) -> dict:
        """End stage 3: U3 (survivors) is fixed. Returns the request {"survivors": [ids]}."""
        self._require(_Stage.MASKED_INPUT)
        self.u3 = sorted(self._masked)
        self._need(self.u3, "sent masked input")
        self._stage = _Stage.UNMASK
        return {"survivors": list(self.u3)}

    def receive_unmask(self, client_id: int, msg: dict[str, bytes]) -> None:
        """Stage 4: a survivor's shares. A response asking for the wrong kind is rejected."""
        self._require(_Stage.UNMASK)
        dropped = set(self.u2) - set(self.u3)
        expected = {f"b/{v}" for v in self.u3} | {f"s/{v}" for v in dropped}
        if client_id not in self.u3 or client_id in self._unmask or set(msg) != expected:
            self.rejected[client_id] = "unmask response does not match the survivor list"
            self._unmask.pop(client_id, None)
            return
        if any(len(bytes(v)) != SHARE_BYTES for v in msg.values()):
            self.rejected[client_id] = "malformed share"
            return
        self._unmask[client_id] = msg

    def finalize(self) -> np.ndarray:
        """End stage 4: the float64 sum of the survivors' vectors (dequantised).

        Raises SecAggAborted below t responses or when a secret cannot be recovered.
        """
        self._require(_Stage.UNMASK)
        self._stage = _Stage.DONE
        responders = sorted(self._unmask)
        self._need(responders, "answered the unmask request")
        survivors = list(self.u3)
        dropped = sorted(set(self.u2) - set(self.u3))
        # The "never both" rule: a member is in exactly one of the two sets.
        if set(survivors) & set(dropped):
            raise SecAggAborted("a member is both a survivor and dropped")
        fp = self.fixed_point
        n = self.vector_len

        def collect(kind: str, member: int) -> dict[int, int]:
            return {
                _x(r): int.from_bytes(self._unmask[r][f"{kind}/{member}"], "big")
                for r in responders
            }

        # Recover every secret before touching the masked vectors, so a failure leaves no
        # partially unmasked sum behind.
        try:
            seeds = {u: shamir_combine(collect("b", u), self.threshold) for u in survivors}
            dropped_keys = {}
            for v in dropped:
                raw = shamir_combine(collect("s", v), self.threshold)
                key = X25519PrivateKey.from_private_bytes(raw)
                if _raw_public(key) != self._keys[v][1]:
                    raise SecAggError(
                        f"reconstructed mask key of {v} does not match its public key"
                    )
                dropped_keys[v] = key
        except SecAggError as exc:
            raise SecAggAborted(f"round {self.round_id}: cannot recover secrets: {exc}") from exc

        total = np.zeros(n, dtype=fp.dtype)
        for u in survivors:
            total += self._masked[u]
            total -= mask_stream(seeds[u], self.round_id, b"self", n, fp.dtype)
        for v, key in dropped_keys.items():
            for u in survivors:
                shared = _exchange(key, self._keys[u][1])
                mask = mask_stream(
                    pairwise_seed(shared, self.round_id, u, v),
                    self.round_id,
                    b"pairwise",
                    n,
                    fp.dtype,
                )
                # u added +mask if u < v (and -mask otherwise); take it back out.
                if u < v:
                    total -= mask
                else:
                    total += mask
        self._masked.clear()
        return fp.dequantize(total)


# --------------------------------------------------------------------------------------
# Weighted payloads and a micro-benchmark
# --------------------------------------------------------------------------------------


def flatten_params(params: dict) -> tuple[np.ndarray, list[tuple[str, tuple[int, ...]]]]:
    """Concatenate an adapter dict (numpy arrays or torch tensors) into one float64 vector.

    Returns (vector, layout); layout is [(name, shape)] in sorted-name order, so every
    member and the server lay the same adapter out the same way.
    """
    layout, parts = [], []
    for name in sorted(params):
        value = params[name]
        if hasattr(value, "detach"):
            value = value.detach().to("cpu").double().numpy()
        arr = np.asarray(value, dtype=np.float64)
        layout.append((name, tuple(arr.shape)))
        parts.append(arr.ravel())
    return np.concatenate(parts) if parts else np.zeros(0), layout


def unflatten_params(
    vector: np.ndarray, layout: list[tuple[str, tuple[int, ...]]]
) -> dict[str, np.ndarray]:
    """Inverse of `flatten_params`: split a vector back into {name: array}.

    Raises ValueError when the vector length does not match the layout.
    """
    sizes = [int(np.prod(shape)) for _, shape in layout]
    if sum(sizes) != len(vector):
        raise ValueError(f"vector has {len(vector)} values, layout needs {sum(sizes)}")
    out, start = {}, 0
    for (name, shape), size in zip(layout, sizes, strict=True):
        out[name] = np.asarray(vector[start : start + size]).reshape(shape)
        start += size
    return out


def weighted_payload(vector: np.ndarray, weight: float) -> np.ndarray:
    """The vector a member masks for weighted averaging: [w * x, w].

    Use a weight in [0, 1] (e.g. examples / an agreed cap) so w*x stays within the clip.
    """
    v = np.asarray(vector, dtype=np.float64).reshape(-1)
    return np.concatenate([v * float(weight), [float(weight)]])


def weighted_mean(total: np.ndarray) -> np.ndarray:
    """Split a summed weighted payload: sum(w x) / sum(w). Raises ValueError if sum(w) <= 0."""
    weight = float(total[-1])
    if weight <= 0:
        raise ValueError("total weight is not positive")
    return total[:-1] / weight


def run_round(
    vectors: dict[int, np.ndarray],
    round_id: str,
    threshold: int,
    fixed_point: FixedPoint,
    drop_before_masking: set[int] | frozenset[int] = frozenset(),
    drop_before_unmask: set[int] | frozenset[int] = frozenset(),
) -> np.ndarray:
    """Run one whole round in memory (tests, benchmarks, simulation): the unmasked sum."""
    n = len(next(iter(vectors.values())))
    server = SecAggServer(round_id, threshold, n, fixed_point)
    clients = {c: SecAggClient(c, round_id, threshold, fixed_point) for c in vectors}
    for c, cl in clients.items():
        server.receive_advertisement(c, cl.advertise_keys())
    roster = server.close_advertise()
    for c, cl in clients.items():
        server.receive_shares(c, cl.share_keys(roster))
    inboxes = server.close_share_keys()
    for c, cl in clients.items():
        if c not in drop_before_masking:
            server.receive_masked_input(c, cl.masked_input(vectors[c], inboxes[c]))
    request = server.close_masked_input()
    for c in request["survivors"]:
        if c not in drop_before_unmask:
            server.receive_unmask(c, clients[c].unmask(request))
    return server.finalize()


def secagg_overhead(n_clients: int, vector_len: int, dropouts: int = 0) -> dict[str, float]:
    """Time one round: mean seconds of client work per member, and the server's seconds.

    ``dropouts`` members vanish after sharing keys, so the server pays for recovering their
    pairwise masks (its worst case). Returns {"client_s", "server_s", "plain_sum_s"}.
    """
    rng = np.random.default_rng(0)
    fp = FixedPoint.for_sum(1.0, n_clients)
    t = default_threshold(n_clients)
    ids = list(range(1, n_clients + 1))
    vectors = {c: rng.uniform(-1, 1, vector_len) for c in ids}
    dropped = set(ids[:dropouts])
    server = SecAggServer(f"bench/{n_clients}/{vector_len}", t, vector_len, fp)
    clients = {c: SecAggClient(c, server.round_id, t, fp) for c in ids}
    client_s = server_s = 0.0

    def timed(fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        return out, time.perf_counter() - start

    for c in ids:
        msg, dt = timed(clients[c].advertise_keys)
        client_s += dt
        server_s += timed(server.receive_advertisement, c, msg)[1]
    roster, dt = timed(server.close_advertise)
    server_s += dt
    for c in ids:
        msg, dt = timed(clients[c].share_keys, roster)
        client_s += dt
        server_s += timed(server.receive_shares, c, msg)[1]
    inboxes, dt = timed(server.close_share_keys)
    server_s += dt
    for c in ids:
        if c in dropped:
            continue
        msg, dt = timed(clients[c].masked_input, vectors[c], inboxes[c])
        client_s += dt
        server_s += timed(server.receive_masked_input, c, msg)[1]
    request, dt = timed(server.close_masked_input)
    server_s += dt
    for c in request["survivors"]:
        msg, dt = timed(clients[c].unmask, request)
        client_s += dt
        server_s += timed(server.receive_unmask, c, msg)[1]
    total, dt = timed(server.finalize)
    server_s += dt
    start = time.perf_counter()
    plain = np.sum([vectors[c] for c in ids if c not in dropped], axis=0)
    plain_s = time.perf_counter() - start
    if not np.allclose(total, plain, atol=n_clients / fp.scale):
        raise AssertionError("secure sum differs from the plain sum")
    return {
        "client_s": client_s / n_clients,
        "server_s": server_s,
        "plain_sum_s": plain_s,
    }


def transcript_digest(roster: dict[str, bytes]) -> str:
    """A short digest of the roster, for members and server to log and compare out of band."""
    h = hashlib.sha256()
    for key in sorted(roster, key=int):
        h.update(_ids(int(key)) + bytes(roster[key]))
    return h.hexdigest()[:16]
