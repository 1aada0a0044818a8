"""Typed errors. Services map them to gRPC status codes in one place (common/rpc/status.py)."""
from __future__ import annotations


class MnemosyneError(Exception):
    """Base of every error the system raises on purpose."""


class ConfigError(MnemosyneError, ValueError):
    """A configuration value is invalid; the message names it."""


class InvalidRequestError(MnemosyneError, ValueError):
    """A request is malformed (empty prompt, bad token ids, too long, bad sampling values)."""


class ModelLoadError(MnemosyneError):
    """A checkpoint could not be found or read."""


class CapacityError(MnemosyneError):
    """Not enough KV blocks (or another resource) to take the request now."""


class KVTransferError(MnemosyneError):
    """A KV transfer failed, timed out, or the peers' layouts do not match."""


class RequestAbortedError(MnemosyneError):
    """The request was aborted (client cancel or failure elsewhere)."""


class WorkerFailedError(MnemosyneError):
    """A worker process died or stopped answering."""


class PlacementError(MnemosyneError):
    """The kvstore could not place, find or renew a request's KV placement."""


class StalePlacementError(PlacementError):
    """A call carried a placement epoch that is not the live placement's: the caller holds an
    expired, released or replaced placement (FAILED_PRECONDITION). Never retried with the same epoch."""


class KVCorruptedError(KVTransferError):
    """KV arrived whose checksum does not match what the sender computed (DATA_LOSS): the request
    fails and its blocks are freed, never decoded from."""


#: How a KV receiver's failure reason starts when a chunk failed its checksum (the reason travels as
#: text from the receiving worker through the engine; kv_transfer_error types it again).
CHECKSUM_MISMATCH = "KV checksum mismatch"


def kv_transfer_error(message: str) -> KVTransferError:
    """The typed error of a failed KV transfer whose reason is `message`: KVCorruptedError when the
    reason is a checksum mismatch, else KVTransferError."""
    return (KVCorruptedError if CHECKSUM_MISMATCH in message else KVTransferError)(message)


class UnreachableError(WorkerFailedError):
    """Nothing answers at a service's address (connection refused, unknown host): the service is
    not running there, as opposed to a running one that failed the request."""


class UnauthenticatedError(MnemosyneError):
    """No API key, or one the router does not know (UNAUTHENTICATED)."""


class PermissionDeniedError(MnemosyneError):
    """An authenticated caller asked for something that is not theirs (PERMISSION_DENIED)."""
