"""What the vault raises. None of these is an HTTP error: views map them."""

from django.core.exceptions import ImproperlyConfigured


class VaultError(Exception):
    """Base class of every vault error."""


class BlobNotFound(VaultError):
    """No such blob for this tenant: unknown id, another tenant's id, or destroyed."""


class BlobTooLarge(VaultError):
    """The source held more than `max_bytes`; nothing was stored."""

    def __init__(self, max_bytes: int):
        super().__init__(f"the blob is larger than the limit of {max_bytes} bytes")
        self.max_bytes = max_bytes


class VaultIntegrityError(VaultError):
    """A ciphertext or wrapped key failed to authenticate: it was altered or moved."""


class BlobTampered(VaultIntegrityError):
    """A blob (its file, its wrapped data key or its tenant key) failed to authenticate.

    Raised by `blob_open` before the first chunk when a key fails, or in the middle of
    the stream at the first chunk that fails: a consumer must treat everything it got
    from that stream as untrusted.
    """


class MasterKeyError(ImproperlyConfigured, VaultError):
    """The platform master key is missing, garbled, or lacks a key the database needs.

    The message names the environment variable or file to fix.
    """
