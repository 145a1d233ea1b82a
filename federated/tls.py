"""Certificates and keys for a federation, made with ``cryptography``.

Two separate things:

- TLS: a federation CA signs the SuperLink's server certificate (SANs: the DNS names and IP
  addresses members dial). Members get the CA certificate (``--root-certificates``) and so
  reach only this SuperLink; the SuperLink serves with ``--ssl-ca-certfile``,
  ``--ssl-certfile``, ``--ssl-keyfile``.
- Node authentication: each member holds an EC P-384 private key (OpenSSH PEM, what
  ``flower-supernode --auth-supernode-private-key`` reads); the platform registers the
  member's public key (OpenSSH one-line form, ``flwr supernode register``) with a SuperLink
  started with ``--enable-supernode-auth``. A node whose key is not registered is refused.

Keys are written with mode 0600. Nothing here talks to the network.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class ServerTLS:
    ca_cert: Path  # give to members (--root-certificates) and to flwr (root-certificates)
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class NodeKey:
    private_key: Path  # stays on the member's premises
    public_key: Path  # registered at the SuperLink


def _write(path: Path, data: bytes, private: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if private:
        # Create with 0600 from the start; a chmod afterwards leaves a readable window.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def make_server_tls(
    out_dir: str | Path,
    *,
    hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
    days: int = 365,
    name: str = "Enclave federation",
) -> ServerTLS:
    """A CA and a server certificate for ``hosts`` (IP addresses or DNS names) in out_dir.

    Returns the paths. ValueError for an empty ``hosts``.
    """
    if not hosts:
        raise ValueError("the server certificate needs at least one host")
    out = Path(out_dir)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA384())
    )
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA384())
    )
    pem = serialization.Encoding.PEM
    return ServerTLS(
        ca_cert=_write(out / "ca.crt", ca_cert.public_bytes(pem)),
        server_cert=_write(out / "server.crt", server_cert.public_bytes(pem)),
        server_key=_write(
            out / "server.key",
            server_key.private_bytes(
                pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
            private=True,
        ),
    )


def make_node_key(out_dir: str | Path, name: str) -> NodeKey:
    """An EC P-384 key pair for SuperNode authentication: ``<name>`` (OpenSSH private key)
    and ``<name>.pub`` (OpenSSH public key line)."""
    out = Path(out_dir)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return NodeKey(
        private_key=_write(out / name, private, private=True),
        public_key=_write(out / f"{name}.pub", public + b"\n"),
    )
