"""Envelope encryption of every stored blob (datasets, adapters, checkpoints). Issue 7.

How it works
------------
Three layers of AES-256-GCM keys (`cryptography`'s AESGCM; see `crypto` for the format)::

    master key  (environment, key file, or embedded VAR_DIR/keys/master.keyring; `keyring`)
      wraps  tenant key   (TenantKey row: key_id, wrapped_key, master_key_id)
        wraps  data key   (Blob row: wrapped_data_key, tenant_key_id), one per blob
          seals  the blob file, VAULT_DIR/<tenant pk>/<xx>/<blob uuid>.blob, in chunks

Every wrap and every chunk carries associated data: a wrapped tenant key is bound to its
tenant and key id; a wrapped data key to its tenant, blob and tenant key; each chunk to
its tenant, blob, file header, index and a final flag. So a file or a wrapped key moved
to another tenant or blob, a flipped byte, reordered, dropped or appended chunks all fail
as BlobTampered. Files are written and read as a stream of chunks (1 MiB by default,
ENCLAVE_VAULT_CHUNK_BYTES): no blob is ever whole in memory, and no plaintext is written.

Public API (services.py writes, selectors.py reads; all tenant-scoped)::

    blob_put(*, tenant, kind, source, max_bytes=None, chunk_size=None) -> Blob
    blob_open(*, tenant, blob_id) -> Iterator[bytes]           (selectors)
    blob_read_bytes(*, tenant, blob_id) -> bytes                (selectors; also services)
    blob_get / blob_list(*, tenant, ...)                        (selectors)
    blob_destroy(*, tenant, blob_id) -> None
    tenant_keys_destroy(*, tenant) -> None
    master_key_rotate(*, install_new_key=True) -> MasterKeyRotation
    master_key_retire_previous() -> MasterKeyRetirement
    blob_orphans_remove(*, older_than_seconds=3600) -> list[Path]

Errors (exceptions.py): BlobNotFound (another tenant's, unknown or destroyed id),
BlobTooLarge, BlobTampered (a VaultIntegrityError), MasterKeyError (an
ImproperlyConfigured naming the variable or file to fix).

Erasure is crypto-shredding: `blob_destroy` deletes the wrapped data key from the row,
`tenant_keys_destroy` deletes the tenant's wrapped tenant keys (and every blob's data
key); files are removed after commit, best effort, since without the key they are noise.
Caveat: PostgreSQL keeps dead row versions until VACUUM, and database backups keep old
rows. A wrapped key in a backup is only usable with a master key that is still kept, so
for erasure that also holds against backups, rotate the master key after the erasure and
retire the old key once the backups that need it expire.

Master key rotation and crash safety
------------------------------------
`manage.py rotate_master_key` (services.master_key_rotate) never reads or writes a blob;
it only re-wraps TenantKey rows. The invariant: every live tenant key is wrapped under a
master key that is in the keyring. Each step keeps it:

1. Install (keyring files only): a fresh key is written as the new current key with all
   old keys kept, into a temporary file that is fsynced, renamed over the keyring and
   followed by an fsync of the directory, under an exclusive flock (two rotations cannot
   lose each other's key). A crash leaves the old keyring or the new one, never a mix.
2. Re-wrap: each tenant key is unwrapped with its recorded master key and wrapped under
   the current one in its own transaction, with its row locked. A crash leaves some rows
   under the old key and some under the new; both are in the keyring, so all blobs read.
   Running the command again sees rows under a non-current key and finishes them
   without generating another key ("resumed"); new tenant keys meanwhile are created
   under the current key, because every process re-reads the keyring on each use.
3. Retire is a separate, explicit step (`rotate_master_key --retire`): it drops only
   previous keys that no live tenant key is wrapped under, and refuses the others.
   Keeping it separate means a process that read the keyring just before step 1 cannot
   wrap a new tenant key under a key being removed.

With ENCLAVE_MASTER_KEY the environment is the keyring and Enclave cannot write it: the
operator sets ENCLAVE_MASTER_KEY to a new key and ENCLAVE_MASTER_KEY_PREVIOUS to the old
one in every process and restarts; the command then re-wraps (step 2), and `--retire`
says which keys can be removed from ENCLAVE_MASTER_KEY_PREVIOUS. The command prints this
procedure and never prints key material. Because the new key is installed before any row
is re-wrapped under it, no crash can leave a row under a key that was never stored.

blob_put writes the file to a temporary name, fsyncs and renames it, then inserts the
row; a crash in between leaves a file whose data key never reached the database
(unreadable; `blob_orphans_remove` reclaims it). No row ever names a partial file.

Tests that prove it
-------------------
tests/controlplane/test_vault.py: round trips (empty, partial, exact and multi-chunk;
file and iterable sources), streaming to disk, each tampering (flipped byte, swapped,
dropped, cut or appended chunks, header, swapped or altered wrapped keys), a file and
row moved to another tenant, foreign ids, max_bytes, no plaintext on disk, destroyed
blobs and tenants unrecoverable with their files restored.
tests/controlplane/test_vault_keys.py: key sources and errors naming the variable,
rotation with byte-identical files, an interrupted rotation that resumes, a crash after
install, environment rotation, a corrupt tenant key, and the read-only admin.
"""
