"""Registrations bound to the caller's certificate (mutual TLS, common/rpc/tls.py).

Over TLS, an instance may register only in its certificate's role (a prefill certificate registers
prefill instances) and only at an address whose host is one of its certificate's names or its own IP
(the address its connection comes from); it may heartbeat and deregister only registrations it could
have made. Without this, anyone the kvstore serves could register an "instance" at any address and
the router would send users' prompts there. Violations are PermissionDeniedError (PERMISSION_DENIED).
"""
from __future__ import annotations

from common.errors import PermissionDeniedError
from common.metadata.types import Instance
from common.rpc.server import address_host
from common.rpc.tls import Identity

POOL_ROLES = ("prefill", "decode")


def check_registration(who: Identity | None, inst: Instance) -> None:
    """`who` may register `inst` (its role and the host of its address)."""
    if who is None or who.role not in POOL_ROLES:
        raise PermissionDeniedError(f"only prefill and decode instances register; the caller's certificate "
                                    f"is {'of role ' + repr(who.role) if who else 'missing'}")
    if inst.role != who.role:
        raise PermissionDeniedError(f"instance {inst.instance_id}: a {who.role} certificate cannot register a "
                                    f"{inst.role} instance")
    host = address_host(inst.address)
    if not who.may_use_host(host):
        raise PermissionDeniedError(f"instance {inst.instance_id}: address {inst.address!r} is not this caller's "
                                    f"(its certificate names {', '.join(who.names) or 'no host'}; it connects "
                                    f"from {who.address or 'an unknown address'})")


def check_owner(who: Identity | None, registered: Instance | None) -> None:
    """`who` may heartbeat, replace or deregister `registered` (None: no such registration: allowed,
    the store answers for it)."""
    if registered is not None:
        check_registration(who, registered)
