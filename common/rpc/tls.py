"""Mutual TLS between the services: who they are, and what each may call.

Every internal service (kvstore, prefill, decode) serves only over TLS that requires a client
certificate signed by the deployment's CA (a caller without one, or with one from another CA, fails
the handshake: UNAVAILABLE), and every service presents its own certificate when it calls another.
A certificate names its holder's role in its subject CN ("router", "prefill", "decode", "kvstore",
scripts/certs.py); a client checks the server's certificate against the role it meant to call
(TARGET_NAME: "mnemosyne-decode" ...), whatever address it dials, so a prefill instance can never
pose as a decode instance. On the server, `RoleGate` lets only the roles that use a service call it
(PERMISSION_DENIED otherwise); the gRPC health and reflection services stay open to any certificate.

    tls = config.tls.load()                  # Credentials, or None when TLS is off
    server = RpcServer(host, port, tls=tls, roles=("router",))
    channel = rpc_client.aio_channel(address, tls=tls, peer="decode")

The router's public port (clients with API keys) is not behind mutual TLS: clients have no
certificates. Kubernetes' gRPC probes cannot present one either, so a service with TLS can also serve
the health service alone, in plaintext, on `--health-port`.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any, Iterable

import grpc

from common.errors import ConfigError
from common.rpc.handlers import run_first

ROLES = ("router", "prefill", "decode", "kvstore")
#: Services any authenticated peer may call (probes, grpcurl).
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def target_name(role: str) -> str:
    """The name a client checks the server's certificate against: a SAN of every `role` certificate."""
    return f"mnemosyne-{role}"


@dataclass(frozen=True)
class TLSConfig:
    """Mutual TLS of one service (its flags: --tls-ca, --tls-cert, --tls-key, --health-port). The three
    files together, or none (plaintext: for debugging only)."""
    ca: str = field(default="", metadata={"flag": "tls-ca", "metavar": "FILE", "help":
                    "PEM of the CA that signs every service's certificate (empty = no TLS: plaintext)"})
    cert: str = field(default="", metadata={"flag": "tls-cert", "metavar": "FILE", "help":
                      "this service's certificate (PEM; its CN is its role)"})
    key: str = field(default="", metadata={"flag": "tls-key", "metavar": "FILE", "help":
                     "this service's private key (PEM)"})
    health_port: int = -1                      # with TLS: serve the gRPC health service alone in plaintext on
                                               # this port, for probes without a certificate (0 = a free one,
                                               # -1 = none)

    def __post_init__(self) -> None:
        given = [bool(self.ca), bool(self.cert), bool(self.key)]
        if any(given) and not all(given):
            raise ConfigError("tls: --tls-ca, --tls-cert and --tls-key go together (all three or none)")
        if not -1 <= self.health_port < 65536:
            raise ConfigError(f"tls: health_port must be in [-1, 65535], got {self.health_port}")

    @property
    def enabled(self) -> bool:
        return bool(self.ca)

    def load(self) -> "Credentials | None":
        """The files' contents (None when TLS is off); ConfigError naming the flag of a bad file."""
        if not self.enabled:
            return None
        data = {}
        for flag, path in (("--tls-ca", self.ca), ("--tls-cert", self.cert), ("--tls-key", self.key)):
            try:
                data[flag] = open(path, "rb").read()
            except OSError as e:
                raise ConfigError(f"tls: cannot read {flag} {path}: {e.strerror}") from None
            if b"-----BEGIN " not in data[flag]:
                raise ConfigError(f"tls: {flag} {path} is not a PEM file")
        return Credentials(data["--tls-ca"], data["--tls-cert"], data["--tls-key"])


@dataclass(frozen=True)
class Credentials:
    """Loaded PEM bytes: the CA's certificate, this service's certificate and key."""
    ca: bytes = field(repr=False)
    cert: bytes = field(repr=False)
    key: bytes = field(repr=False)

    def server(self) -> grpc.ServerCredentials:
        """Server side: our certificate; callers must present one the CA signed."""
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.ca,
                                           require_client_auth=True)

    def channel(self) -> grpc.ChannelCredentials:
        """Client side: trust only the CA; present our certificate."""
        return grpc.ssl_channel_credentials(self.ca, self.key, self.cert)


def channel_options(peer: str) -> list[tuple[str, Any]]:
    """Channel options that make the client check the server's certificate against role `peer`."""
    if peer not in ROLES:
        raise ValueError(f"tls: unknown peer role {peer!r} (one of {', '.join(ROLES)})")
    return [("grpc.ssl_target_name_override", target_name(peer))]


@dataclass(frozen=True)
class Identity:
    """Who called, from their verified certificate and the connection."""
    role: str                                  # the certificate's CN
    names: tuple[str, ...]                     # its subject alternative names (DNS names and IPs)
    address: str                               # the caller's IP address ("" when unknown)

    def may_use_host(self, host: str) -> bool:
        """Whether this caller may advertise `host`: one of its certificate's names, or its own IP."""
        host = host.strip("[]")
        if host in self.names:
            return True
        try:
            return ipaddress.ip_address(host) == ipaddress.ip_address(self.address)
        except ValueError:
            return False


def peer_address(peer: str) -> str:
    """The IP of a gRPC peer string ("ipv4:127.0.0.1:5000", "ipv6:[::1]:5000"); "" otherwise."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    if kind == "ipv6":
        return rest.rpartition(":")[0].strip("[]")
    return ""


def identity(context: Any) -> Identity | None:
    """The caller's identity on a TLS server (None on a plaintext one: no certificate)."""
    auth = context.auth_context() or {}
    if auth.get("transport_security_type") != [b"ssl"] or not auth.get("x509_common_name"):
        return None
    return Identity(auth["x509_common_name"][0].decode(),
                    tuple(n.decode() for n in auth.get("x509_subject_alternative_name", ())),
                    peer_address(context.peer() or ""))


class RoleGate(grpc.aio.ServerInterceptor):
    """Lets only callers whose certificate's role is in `roles` call the server's services (health and
    reflection excepted); the others get PERMISSION_DENIED naming their role. Only on TLS servers."""

    def __init__(self, roles: Iterable[str]) -> None:
        self.roles = frozenset(roles)
        unknown = self.roles - set(ROLES)
        if unknown:
            raise ValueError(f"tls: unknown roles {sorted(unknown)}")

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(OPEN_SERVICES):
            return handler
        roles = self.roles

        async def check(context: grpc.aio.ServicerContext) -> None:
            who = identity(context)
            if who is None or who.role not in roles:
                caller = f"role {who.role!r}" if who else "callers without a certificate"
                await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                    f"{method} is not open to {caller} (allowed: {', '.join(sorted(roles))})")

        return run_first(handler, check)
