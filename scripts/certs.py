"""A local certificate authority and one certificate per service role, for mutual TLS between the
services (common/rpc/tls.py). `make up` runs `ensure_certs()` into .mnemosyne/tls (git-ignored); for
Kubernetes, run it once and put the files in the Secrets deploy/k8s mounts (deploy/k8s/README.md):

    .venv/bin/python scripts/certs.py [--dir .mnemosyne/tls] [--namespace NS] [--host H ...] [--days N]

Writes, in DIR: ca.pem (the CA certificate every service trusts) and ca-key.pem (the CA's key, to issue
more; keep it out of the pods), and per role in router, prefill, decode, kvstore: <role>.pem (its
certificate) and <role>-key.pem. Keys are 0600, the directory 0700.

Identity: a certificate's subject CN is its role; its subject alternative names are
mnemosyne-<role> (the name every client checks the server against, whatever address it dials),
the Kubernetes Service names of that role (mnemosyne-<role>, .NS.svc, .NS.svc.cluster.local with
--namespace), localhost, 127.0.0.1, ::1 and each --host. The kvstore accepts an instance's registration
only when its role is the certificate's and its address one of these hosts or the caller's own IP
(services/kvstore/server.py).
"""
from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import pathlib
import sys

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ROOT = pathlib.Path(__file__).resolve().parent.parent
ROLES = ("router", "prefill", "decode", "kvstore")
DEFAULT_DIR = ROOT / ".mnemosyne" / "tls"
DEFAULT_DAYS = 365
RENEW_BEFORE = datetime.timedelta(days=7)     # ensure_certs makes new ones when they expire sooner


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())        # P-256: fast to make, small handshakes


def _write(path: pathlib.Path, data: bytes, private: bool) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def names(role: str, namespace: str = "", hosts: tuple[str, ...] = ()) -> list[x509.GeneralName]:
    """The subject alternative names of `role`'s certificate."""
    service = f"mnemosyne-{role}"
    dns = [service, "localhost"]
    if namespace:
        dns += [f"{service}.{namespace}.svc", f"{service}.{namespace}.svc.cluster.local"]
    ips = ["127.0.0.1", "::1"]
    for h in hosts:
        try:
            ipaddress.ip_address(h)
            ips.append(h)
        except ValueError:
            dns.append(h)
    return ([x509.DNSName(d) for d in dict.fromkeys(dns)]
            + [x509.IPAddress(ipaddress.ip_address(i)) for i in dict.fromkeys(ips)])


def generate(directory: str | os.PathLike = DEFAULT_DIR, *, namespace: str = "", hosts: tuple[str, ...] = (),
             days: int = DEFAULT_DAYS, ca_name: str = "mnemosyne local CA") -> pathlib.Path:
    """A new CA and a certificate per role in `directory` (replacing what is there)."""
    d = pathlib.Path(directory)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)
    ca_key = _key()
    ca_subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mnemosyne"),
                            x509.NameAttribute(NameOID.COMMON_NAME, ca_name)])
    ca = (x509.CertificateBuilder().subject_name(ca_subject).issuer_name(ca_subject)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    _write(d / "ca-key.pem", _pem_key(ca_key), private=True)
    _write(d / "ca.pem", ca.public_bytes(serialization.Encoding.PEM), private=False)
    for role in ROLES:
        key = _key()
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mnemosyne"),
                                         x509.NameAttribute(NameOID.COMMON_NAME, role)]))
                .issuer_name(ca_subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.SubjectAlternativeName(names(role, namespace, hosts)), critical=False)
                # every service is a server and a client of the others
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                               critical=False)
                .sign(ca_key, hashes.SHA256()))
        _write(d / f"{role}-key.pem", _pem_key(key), private=True)
        _write(d / f"{role}.pem", cert.public_bytes(serialization.Encoding.PEM), private=False)
    return d


def ensure_certs(directory: str | os.PathLike = DEFAULT_DIR) -> pathlib.Path:
    """What `make up` does: the certificates in `directory`, made when missing, unreadable or expiring
    within RENEW_BEFORE (then all of them, with a new CA)."""
    d = pathlib.Path(directory)
    files = [d / "ca.pem", *(d / f"{r}{s}.pem" for r in ROLES for s in ("", "-key"))]
    try:
        soon = datetime.datetime.now(datetime.timezone.utc) + RENEW_BEFORE
        certs = [x509.load_pem_x509_certificate(f.read_bytes()) for f in files if not f.name.endswith("-key.pem")]
        if all(f.exists() for f in files) and all(c.not_valid_after_utc > soon for c in certs):
            return d
    except (OSError, ValueError):
        pass
    return generate(d)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/certs.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default=str(DEFAULT_DIR), help="where to write them (default: %(default)s)")
    p.add_argument("--namespace", default="", help="Kubernetes namespace: adds the Services' .NS.svc names")
    p.add_argument("--host", action="append", default=[], help="one more host name or IP in every certificate")
    p.add_argument("--days", type=int, default=DEFAULT_DAYS, help="validity (default: %(default)s)")
    args = p.parse_args(argv)
    d = generate(args.dir, namespace=args.namespace, hosts=tuple(args.host), days=args.days)
    print(f"certs: CA {d / 'ca.pem'}; per role {', '.join(ROLES)}: {d}/<role>.pem, {d}/<role>-key.pem")
    return 0


if __name__ == "__main__":
    sys.exit(main())
