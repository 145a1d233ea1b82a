"""Master keys: where they come from, errors that name the variable, rotation by
`rotate_master_key` (file and environment keyrings, crash and resume), and the admin."""

import base64
import hashlib
import io
import os
import stat
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from controlplane.tenancy.services import tenant_create
from controlplane.vault import conf, crypto, selectors, services
from controlplane.vault.exceptions import MasterKeyError
from controlplane.vault.keyring import keyring_install_new_key, load_keyring, master_key_id
from controlplane.vault.models import Blob, TenantKey

CHUNK = 64
KEY_VARS = (
    conf.MASTER_KEY_ENV,
    conf.MASTER_KEY_PREVIOUS_ENV,
    conf.MASTER_KEY_FILE_ENV,
    "ENCLAVE_VAULT_DIR",
    "ENCLAVE_VAULT_CHUNK_BYTES",
)


@pytest.fixture(autouse=True)
def var_dir(settings, tmp_path, monkeypatch) -> Path:
    var = tmp_path / "var"
    var.mkdir()
    settings.VAR_DIR = var
    settings.ENCLAVE_VAULT_CHUNK_BYTES = CHUNK
    for name in KEY_VARS:
        monkeypatch.delenv(name, raising=False)
    return var


@pytest.fixture
def tenants(db):
    return [tenant_create(slug=slug, name=slug.title()) for slug in ("bank", "clinic")]


def _key() -> tuple[str, bytes]:
    material = os.urandom(32)
    return base64.b64encode(material).decode(), material


def _fill(tenants) -> dict:
    """Two multi-chunk blobs per tenant; returns {blob: plaintext}."""
    stored = {}
    for tenant in tenants:
        for seed in (1, 2):
            data = os.urandom(300 + seed)
            stored[services.blob_put(tenant=tenant, kind="dataset", source=[data])] = data
    return stored


def _digests() -> dict[str, str]:
    root = conf.vault_dir()
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file()
    }


def _all_readable(stored: dict) -> bool:
    return all(
        selectors.blob_read_bytes(tenant=blob.tenant, blob_id=blob.id) == data
        for blob, data in stored.items()
    )


def _command(*args) -> str:
    out = io.StringIO()
    call_command("rotate_master_key", *args, stdout=out)
    return out.getvalue()


# --- sources ---------------------------------------------------------------------------


def test_the_embedded_key_is_generated_once_with_mode_0600(var_dir):
    first = load_keyring()
    path = var_dir / "keys" / "master.keyring"
    assert first.source == "embedded" and first.location == str(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    again = load_keyring()
    assert again.current.key_id == first.current.key_id
    assert first.current.key_id == master_key_id(first.current.material)


def test_the_key_comes_from_the_environment_or_a_file(monkeypatch, tmp_path):
    text, material = _key()
    monkeypatch.setenv(conf.MASTER_KEY_ENV, text)
    assert load_keyring().current.material == material
    assert load_keyring().source == "environment"

    monkeypatch.delenv(conf.MASTER_KEY_ENV)
    key_file = tmp_path / "master.key"
    key_file.write_text(text + "\n")
    key_file.chmod(0o644)
    monkeypatch.setenv(conf.MASTER_KEY_FILE_ENV, str(key_file))
    with pytest.warns(UserWarning, match="readable by others; chmod 600"):
        load_keyring()
    key_file.chmod(0o600)
    from_file = load_keyring()
    assert (from_file.source, from_file.current.material) == ("file", material)


@pytest.mark.parametrize(
    ("env", "named", "says"),
    [
        ({conf.MASTER_KEY_ENV: "not base64 at all!"}, conf.MASTER_KEY_ENV, "not valid base64"),
        (
            {conf.MASTER_KEY_ENV: base64.b64encode(b"0123456789abcdef").decode()},
            conf.MASTER_KEY_ENV,
            "16 bytes",
        ),
        ({conf.MASTER_KEY_ENV: ""}, conf.MASTER_KEY_ENV, "set but empty"),
        (
            {conf.MASTER_KEY_ENV: "KEY", conf.MASTER_KEY_PREVIOUS_ENV: "garbled!"},
            conf.MASTER_KEY_PREVIOUS_ENV,
            "not valid base64",
        ),
        (
            {conf.MASTER_KEY_FILE_ENV: "/nonexistent/master.key"},
            conf.MASTER_KEY_FILE_ENV,
            "not exist",
        ),
        ({conf.MASTER_KEY_FILE_ENV: "GARBLED"}, conf.MASTER_KEY_FILE_ENV, "line 2"),
        ({conf.MASTER_KEY_FILE_ENV: "EMPTY"}, conf.MASTER_KEY_FILE_ENV, "holds no key"),
        (
            {conf.MASTER_KEY_ENV: "KEY", conf.MASTER_KEY_FILE_ENV: "x"},
            conf.MASTER_KEY_FILE_ENV,
            "both",
        ),
    ],
)
def test_a_missing_or_garbled_master_key_names_the_variable(
    tenants, monkeypatch, tmp_path, env, named, says
):
    good, _ = _key()
    for name, value in env.items():
        if value == "KEY":
            value = good
        elif value in ("GARBLED", "EMPTY"):
            path = tmp_path / "master.key"
            path.write_text("# a comment\nthis is no key\n" if value == "GARBLED" else "# none\n")
            path.chmod(0o600)
            value = str(path)
        monkeypatch.setenv(name, value)

    with pytest.raises(MasterKeyError) as caught:
        services.blob_put(tenant=tenants[0], kind="dataset", source=[b"secret"])
    message = str(caught.value)
    assert named in message and says in message
    assert good not in message
    assert not Blob.objects.exists()


def test_a_master_key_missing_from_the_keyring_names_the_variables(tenants, monkeypatch):
    old, _ = _key()
    monkeypatch.setenv(conf.MASTER_KEY_ENV, old)
    blob = services.blob_put(tenant=tenants[0], kind="dataset", source=[b"x"])
    new, _ = _key()
    monkeypatch.setenv(conf.MASTER_KEY_ENV, new)  # old key dropped without re-wrapping

    with pytest.raises(MasterKeyError) as caught:
        selectors.blob_read_bytes(tenant=tenants[0], blob_id=blob.id)
    assert conf.MASTER_KEY_PREVIOUS_ENV in str(caught.value)
    assert TenantKey.objects.get().master_key_id in str(caught.value)
    with pytest.raises(CommandError, match=conf.MASTER_KEY_PREVIOUS_ENV):
        _command()  # the rotation refuses before changing anything
    assert TenantKey.objects.get().master_key_id == master_key_id(base64.b64decode(old))


# --- rotation --------------------------------------------------------------------------


def test_rotate_master_key_rewraps_every_tenant_key_and_touches_no_blob(tenants, var_dir):
    stored = _fill(tenants)
    old_id = load_keyring().current.key_id
    before = _digests()
    wrapped_before = dict(TenantKey.objects.values_list("key_id", "wrapped_key"))

    output = _command()

    keyring = load_keyring()
    assert keyring.current.key_id != old_id
    assert [key.key_id for key in keyring.previous] == [old_id]
    assert f"Installed a new master key {keyring.current.key_id}" in output
    assert "Re-wrapped 2 tenant key(s)" in output
    assert set(TenantKey.objects.values_list("master_key_id", flat=True)) == {
        keyring.current.key_id
    }
    for key_id, wrapped in TenantKey.objects.values_list("key_id", "wrapped_key"):
        assert bytes(wrapped) != bytes(wrapped_before[key_id])
    assert _digests() == before and len(before) == 4  # every blob file byte-identical
    assert _all_readable(stored)

    retired = _command("--retire")
    assert f"Retired {old_id}" in retired
    assert load_keyring().key_ids == (keyring.current.key_id,)
    assert stat.S_IMODE((var_dir / "keys" / "master.keyring").stat().st_mode) == 0o600
    assert _all_readable(stored) and _digests() == before


def test_a_rotation_interrupted_mid_way_stays_readable_and_resumes(tenants, monkeypatch):
    stored = _fill(tenants)
    old_id = load_keyring().current.key_id
    real_wrap = crypto.wrap_key
    calls = []

    def crash_on_second(**kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("power cut")
        return real_wrap(**kwargs)

    monkeypatch.setattr(crypto, "wrap_key", crash_on_second)
    with pytest.raises(RuntimeError, match="power cut"):
        _command()
    monkeypatch.setattr(crypto, "wrap_key", real_wrap)

    new_id = load_keyring().current.key_id
    assert new_id != old_id
    assert sorted(TenantKey.objects.values_list("master_key_id", flat=True)) == sorted(
        [old_id, new_id]
    )
    assert _all_readable(stored)  # half old, half new: both keys are in the keyring
    # --retire refuses to drop the key still in use
    assert "Still needed" in _command("--retire") and old_id in load_keyring().key_ids

    output = _command()  # run again: finishes under the same new key, generates none
    assert "no new key was generated" in output and "Re-wrapped 1 tenant key(s)" in output
    assert load_keyring().current.key_id == new_id
    assert set(TenantKey.objects.values_list("master_key_id", flat=True)) == {new_id}
    assert _all_readable(stored)


def test_a_crash_right_after_installing_the_key_loses_nothing(tenants):
    stored = _fill(tenants)
    keyring = keyring_install_new_key(keyring=load_keyring())  # then the process dies

    assert _all_readable(stored)
    output = _command()
    assert "Re-wrapped 2 tenant key(s)" in output
    assert load_keyring().current.key_id == keyring.current.key_id


def test_rotation_with_the_key_in_the_environment(tenants, monkeypatch):
    old, _ = _key()
    monkeypatch.setenv(conf.MASTER_KEY_ENV, old)
    stored = _fill(tenants)
    before = _digests()

    first = _command()  # nothing to re-wrap: it says how to install a new key
    assert "Re-wrapped 0" in first
    assert f"{conf.MASTER_KEY_ENV}=<the new key>" in first
    assert f"{conf.MASTER_KEY_PREVIOUS_ENV}=<the current key>" in first
    assert old not in first  # never prints key material

    new, _ = _key()
    monkeypatch.setenv(conf.MASTER_KEY_ENV, new)
    monkeypatch.setenv(conf.MASTER_KEY_PREVIOUS_ENV, old)
    assert _all_readable(stored)
    second = _command()
    assert "Re-wrapped 2 tenant key(s)" in second
    old_id = master_key_id(base64.b64decode(old))
    assert f"remove them from {conf.MASTER_KEY_PREVIOUS_ENV}" in _command("--retire")
    assert old_id in _command("--retire")

    monkeypatch.delenv(conf.MASTER_KEY_PREVIOUS_ENV)
    assert _all_readable(stored) and _digests() == before


def test_a_corrupt_tenant_key_fails_the_command_and_is_left_alone(tenants):
    stored = _fill(tenants)
    broken = TenantKey.objects.get(tenant=tenants[1])
    flipped = bytearray(broken.wrapped_key)
    flipped[20] ^= 1
    TenantKey.objects.filter(pk=broken.pk).update(wrapped_key=bytes(flipped))

    with pytest.raises(CommandError, match=broken.key_id):
        _command()
    assert bytes(TenantKey.objects.get(pk=broken.pk).wrapped_key) == bytes(flipped)
    assert all(
        selectors.blob_read_bytes(tenant=blob.tenant, blob_id=blob.id) == data
        for blob, data in stored.items()
        if blob.tenant == tenants[0]
    )


# --- admin -----------------------------------------------------------------------------


def test_the_admin_is_read_only_and_shows_no_key_material(tenants, admin_client):
    blob = services.blob_put(tenant=tenants[0], kind="dataset", source=[b"x" * 200])
    tenant_key = TenantKey.objects.get()
    secrets = [
        bytes(blob.wrapped_data_key),
        bytes(tenant_key.wrapped_key),
        load_keyring().current.material,
    ]
    pages = [
        "/admin/vault/blob/",
        f"/admin/vault/blob/{blob.pk}/change/",
        "/admin/vault/tenantkey/",
        f"/admin/vault/tenantkey/{tenant_key.pk}/change/",
    ]
    for url in pages:
        response = admin_client.get(url)
        assert response.status_code == 200, url
        body = response.content
        assert tenant_key.key_id.encode() in body
        for secret in secrets:
            for form in (secret, secret.hex().encode(), base64.b64encode(secret)):
                assert form not in body, url
    assert admin_client.get("/admin/vault/blob/add/").status_code == 403
    assert admin_client.post(f"/admin/vault/blob/{blob.pk}/delete/").status_code == 403
