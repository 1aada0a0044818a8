"""The one mapping between typed errors (common/errors.py) and gRPC status codes, both directions.

Server side: a servicer catches `MnemosyneError` and calls `await abort(context, exc)` (or
`abort_sync` in a sync servicer); the status code comes from `status_for`, the details are the
error's message, and the error's class name travels in the trailing metadata key `ERROR_KEY`.

Client side: `error_from_rpc(rpc_error)` turns a failed call back into the typed error, using the
class name from the trailers when the peer is one of ours and the status code otherwise.

Choices:
- KVTransferError and WorkerFailedError -> UNAVAILABLE: the request failed because a peer or a
  transfer failed, not because it was wrong; the caller may retry the whole request (elsewhere).
- PlacementError -> NOT_FOUND: the placement a call names does not exist, or its lease expired.
  (No room for a placement is a CapacityError -> RESOURCE_EXHAUSTED.) StalePlacementError ->
  FAILED_PRECONDITION: the placement exists but under another epoch than the caller's.
- KVCorruptedError -> DATA_LOSS: KV failed its checksum; retrying the same transfer cannot help.
- Anything that is not a MnemosyneError -> INTERNAL (a bug), and the message says so.
"""
from __future__ import annotations

import functools
import inspect
import logging
from typing import Any, Callable, NoReturn

import grpc

from common import errors

log = logging.getLogger(__name__)

ERROR_KEY = "mnemosyne-error"
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"   # = common.admission.RETRY_METADATA_KEY

# Most specific first (ConfigError and InvalidRequestError are also ValueErrors).
_CODES: tuple[tuple[type[errors.MnemosyneError], grpc.StatusCode], ...] = (
    (errors.StalePlacementError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.KVCorruptedError, grpc.StatusCode.DATA_LOSS),
    (errors.InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.ConfigError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.CapacityError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.KVTransferError, grpc.StatusCode.UNAVAILABLE),
    (errors.WorkerFailedError, grpc.StatusCode.UNAVAILABLE),
    (errors.RequestAbortedError, grpc.StatusCode.CANCELLED),
    (errors.PlacementError, grpc.StatusCode.NOT_FOUND),
    (errors.ModelLoadError, grpc.StatusCode.INTERNAL),
    (errors.UnauthenticatedError, grpc.StatusCode.UNAUTHENTICATED),
    (errors.PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
)

# Client side, when the peer did not name the error class: the most likely typed error per code.
_ERRORS_BY_CODE: dict[grpc.StatusCode, type[errors.MnemosyneError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidRequestError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.CapacityError,
    grpc.StatusCode.UNAVAILABLE: errors.WorkerFailedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.WorkerFailedError,
    grpc.StatusCode.CANCELLED: errors.RequestAbortedError,
    grpc.StatusCode.NOT_FOUND: errors.PlacementError,
    grpc.StatusCode.FAILED_PRECONDITION: errors.StalePlacementError,
    grpc.StatusCode.DATA_LOSS: errors.KVCorruptedError,
    grpc.StatusCode.UNAUTHENTICATED: errors.UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDeniedError,
}

_BY_NAME: dict[str, type[errors.MnemosyneError]] = {
    cls.__name__: cls for cls in (errors.MnemosyneError, *(c for c, _ in _CODES))}


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The status code a failed RPC reports for `exc`."""
    for cls, code in _CODES:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


# UTF-8 bytes of a status message. On the wire each non-ASCII byte becomes 3 (percent-encoded), and
# clients refuse trailers over 8 KB (soft limit) to 16 KB (hard): 1,500 bytes stay below both.
MAX_DETAILS = 1500


def details_for(exc: BaseException) -> str:
    """The status message: the typed error's own message, or a marked internal error. A message
    quoting a huge input is cut to MAX_DETAILS bytes: whole, it overflowed gRPC's metadata limit and
    the caller got RESOURCE_EXHAUSTED with no message instead (found by fuzzing)."""
    if isinstance(exc, errors.MnemosyneError):
        text = str(exc) or type(exc).__name__
    else:
        text = f"internal error: {type(exc).__name__}: {exc}"
    raw = text.encode(errors="replace")
    if len(raw) > MAX_DETAILS:
        text = f"{raw[:MAX_DETAILS - 40].decode(errors='ignore')}... ({len(text)} characters in all)"
    return text


def _trailers(exc: BaseException) -> tuple[tuple[str, str], ...]:
    """The nearest class the peer knows (common/errors.py), e.g. StoreUnavailableError ->
    WorkerFailedError; "InternalError" for a non-typed error. An error that carries its own
    trailers (an admission rejection's retry hint, `grpc-retry-pushback-ms`) adds them."""
    name = next((c.__name__ for c in type(exc).__mro__ if c.__name__ in _BY_NAME
                 and _BY_NAME[c.__name__] is c), "InternalError")
    extra = getattr(exc, "trailing_metadata", None)
    return ((ERROR_KEY, name), *(extra() if callable(extra) else ()))


def retry_after_s(err: grpc.RpcError) -> float | None:
    """The server's retry hint (gRPC pushback trailer, milliseconds) of a failed call, in seconds;
    None when it sent none or a negative one (retrying cannot help)."""
    trailers = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    for key, value in trailers or ():
        if key == RETRY_PUSHBACK_KEY:
            try:
                ms = int(value)
            except ValueError:
                return None
            return ms / 1000 if ms >= 0 else None
    return None


async def abort(context: grpc.aio.ServicerContext, exc: BaseException) -> NoReturn:
    """Ends the current RPC of an asyncio servicer with the status for `exc` (raises)."""
    await context.abort(status_for(exc), details_for(exc), trailing_metadata=_trailers(exc))
    raise AssertionError("unreachable: context.abort raises")  # pragma: no cover


def abort_sync(context: grpc.ServicerContext, exc: BaseException) -> NoReturn:
    """Ends the current RPC of a sync servicer with the status for `exc` (raises)."""
    context.set_trailing_metadata(_trailers(exc))
    context.abort(status_for(exc), details_for(exc))
    raise AssertionError("unreachable: context.abort raises")  # pragma: no cover


def handles_errors(method: Callable[..., Any]) -> Callable[..., Any]:
    """Decorates an asyncio servicer method (coroutine or async generator) so a raised error ends
    the RPC with its mapped status. A non-MnemosyneError is a bug: logged with its traceback and
    reported as INTERNAL. Cancellation (asyncio.CancelledError) passes through untouched."""
    if inspect.isasyncgenfunction(method):
        @functools.wraps(method)
        async def stream(self: Any, request: Any, context: grpc.aio.ServicerContext):
            try:
                async for item in method(self, request, context):
                    yield item
            except grpc.aio.AbortError:
                raise
            except Exception as e:  # noqa: BLE001 - mapped to a status here, in one place
                _log(method, e)
                await abort(context, e)
        return stream

    @functools.wraps(method)
    async def unary(self: Any, request: Any, context: grpc.aio.ServicerContext):
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as e:  # noqa: BLE001 - mapped to a status here, in one place
            _log(method, e)
            await abort(context, e)
    return unary


def _log(method: Callable[..., Any], e: Exception) -> None:
    if isinstance(e, errors.MnemosyneError):
        log.debug("%s: %s: %s", method.__qualname__, type(e).__name__, e)
    else:
        log.exception("%s failed with an unexpected error", method.__qualname__)


def error_from_rpc(err: grpc.RpcError) -> errors.MnemosyneError:
    """The typed error for a failed call (`grpc.RpcError` / `grpc.aio.AioRpcError`).

    The message keeps the status code and the peer's details. Codes that map to no typed error
    become a plain MnemosyneError.
    """
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = (err.details() if hasattr(err, "details") else None) or ""
    cls = None
    trailers = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    for key, value in trailers or ():
        if key == ERROR_KEY:
            cls = _BY_NAME.get(value)
    if cls is None:
        cls = _ERRORS_BY_CODE.get(code, errors.MnemosyneError)
    return cls(f"{code.name}: {details}" if details else code.name)
