"""One KV connector for prefill/decode disaggregation, split by role (vLLM v1 style):

- `types.py`: what crosses processes and services: `KVSink` / `GroupSink` (where a request's KV
  goes), `KVEvent` / `KVAck` (a holder's reports to the scheduler side), `kv_layout`.
- `scheduler.py`: `KVConnectorScheduler`, owned by the engine next to its Scheduler: which requests
  stream KV out, which are prepared to receive and awaiting their KV, deadlines, per-holder states
  aggregated into `kv_status`. The same object for one process and for a grid.
- `worker.py`: `KVWorker`, owned by whoever holds KV (the LocalExecutor in-process, or every grid
  worker): gather a chunk out of the paged cache and send it (`KVStreamer`), receive into the cache
  (`KVIntake`), and report terminal states as `KVEvent`s.
"""
