"""KV transfer from prefill stages to decode workers: one contract (base.py), two backends (tcp.py,
nixl.py) with the same protocol (session.py, wire.py, tracker.py). Start with `make_sender` /
`make_receiver`."""
from common.kv_transfer.base import (BACKENDS, KVChunk, KVDest, KVLayout, KVReceiver, KVSender,
                                     TransferHandle, TransferState, make_receiver, make_sender)

__all__ = ["BACKENDS", "KVChunk", "KVDest", "KVLayout", "KVReceiver", "KVSender", "TransferHandle",
           "TransferState", "make_receiver", "make_sender"]
