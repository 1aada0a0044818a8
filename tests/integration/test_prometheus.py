"""deploy/prometheus against the real thing.

promtool accepts the config and the rules and passes the alert unit tests
(deploy/prometheus/tests/alerts_test.yml: multi-window burn, KV full, KV blocks withheld, no decode instance, lease
expiries counted with max). A real Prometheus (the Debian package, started here on a free port)
scrapes four real exporters (router, prefill, decode and kvstore registries of common/metrics.py,
fed synthetic observations of every metric) through the repository's scrape job; then every PromQL
expression of the dashboards, the
recording rules, the alerting rules and the admission's Prometheus load source returns data, every
rule evaluates without error, and every alert is pending or firing (the synthetic load is an
overload that trips them all). Also: the Kubernetes monitors and the PrometheusRule validate
against the CRD schemas in shared/data/k8s-crds, and the PrometheusRule is the rules files.
"""
from __future__ import annotations

import contextlib
import functools
import json
import pathlib
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request

import grpc
import pytest
import yaml

from common.admission import PrometheusSource
from common.errors import CapacityError
from common.metadata.redis_server import free_port
from common.metrics import Metrics, RequestTiming, new_registry, serve_metrics
from tests.integration.test_dashboards import dashboard_exprs, grafana_to_promql, rules

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy/prometheus"
CRDS = ROOT.parent / "shared/data/k8s-crds"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
POOL = "synthetic"

needs_prometheus = pytest.mark.skipif(
    not (pathlib.Path(PROMETHEUS).exists() and pathlib.Path(PROMTOOL).exists()),
    reason="prometheus/promtool not installed (scripts/setup.sh installs the Debian package)")


# ---- static checks ---------------------------------------------------------------------------

@needs_prometheus
def test_promtool_accepts_the_config_and_the_rules_and_the_alert_unit_tests_pass():
    for args in (["check", "config", str(DEPLOY / "prometheus.yml")],
                 ["check", "rules", *map(str, sorted((DEPLOY / "rules").glob("*.yml")))],
                 ["test", "rules", str(DEPLOY / "tests/alerts_test.yml")]):
        proc = subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "SUCCESS" in proc.stdout


def test_prometheusrule_is_rendered_from_the_rules_files():
    sys.path.insert(0, str(DEPLOY / "k8s"))
    try:
        import render_prometheusrule
    finally:
        sys.path.pop(0)
    assert (DEPLOY / "k8s/prometheusrule.yaml").read_text() == render_prometheusrule.render(), \
        "run .venv/bin/python deploy/prometheus/k8s/render_prometheusrule.py"
    groups = yaml.safe_load((DEPLOY / "k8s/prometheusrule.yaml").read_text())["spec"]["groups"]
    assert sum(len(g["rules"]) for g in groups) == len(rules())


@functools.cache
def _crd_schema(api_version: str, kind: str) -> dict:
    group, version = api_version.split("/")
    for path in CRDS.glob(f"{group}_*.yaml"):          # files are named <group>_<plural>.yaml
        crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        if crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == kind:
            for v in crd["spec"]["versions"]:
                if v["name"] == version and v.get("served"):
                    return v["schema"]["openAPIV3Schema"]
    raise AssertionError(f"no CRD for {api_version} {kind} in {CRDS}")


_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "integer": int,
          "number": (int, float)}


def validate(obj, schema: dict, path: str = "$") -> list[str]:
    """Structural (strict) validation against a CRD's OpenAPI v3 schema: types, required fields,
    enums, patterns, and no unknown fields where the schema lists the properties."""
    if obj is None and schema.get("nullable"):
        return []
    if schema.get("x-kubernetes-int-or-string"):
        ok = isinstance(obj, (int, str)) and not isinstance(obj, bool)
        return [] if ok else [f"{path}: want int or string, got {obj!r}"]
    t = schema.get("type")
    if t and (not isinstance(obj, _TYPES[t]) or (t in ("integer", "number") and isinstance(obj, bool))):
        return [f"{path}: want {t}, got {type(obj).__name__}"]
    errors = []
    if "enum" in schema and obj not in schema["enum"]:
        errors.append(f"{path}: {obj!r} not in {schema['enum']}")
    if "pattern" in schema and isinstance(obj, str) and not re.search(schema["pattern"], obj):
        errors.append(f"{path}: {obj!r} does not match {schema['pattern']}")
    if isinstance(obj, dict):
        props = schema.get("properties", {})
        errors += [f"{path}: missing {r}" for r in schema.get("required", []) if r not in obj]
        for k, v in obj.items():
            if k in props:
                errors += validate(v, props[k], f"{path}.{k}")
            elif isinstance(schema.get("additionalProperties"), dict):
                errors += validate(v, schema["additionalProperties"], f"{path}.{k}")
            elif props and not schema.get("x-kubernetes-preserve-unknown-fields"):
                errors.append(f"{path}: unknown field {k!r}")
    if isinstance(obj, list) and "items" in schema:
        for i, item in enumerate(obj):
            errors += validate(item, schema["items"], f"{path}[{i}]")
    return errors


@pytest.mark.parametrize("name", ["podmonitor.yaml", "servicemonitor.yaml", "prometheusrule.yaml"])
def test_kubernetes_resources_validate_against_the_crds(name):
    for doc in yaml.safe_load_all((DEPLOY / "k8s" / name).read_text()):
        schema = _crd_schema(doc["apiVersion"], doc["kind"])
        assert validate(doc, schema) == []
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "mnemosyne"
        endpoints = doc["spec"].get("podMetricsEndpoints") or doc["spec"].get("endpoints") or []
        for ep in endpoints:       # the services' own instance labels must survive the scrape
            assert ep["honorLabels"] is True and ep["port"] == "metrics"
    # the validator does catch mistakes
    bad = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor", "metadata": {},
           "spec": {"selector": {}, "podMetricsEndpoints": [{"port": 9400, "honourLabels": True}]}}
    errors = validate(bad, _crd_schema("monitoring.coreos.com/v1", "PodMonitor"))
    assert any("port" in e for e in errors) and any("honourLabels" in e for e in errors)


# ---- a real Prometheus scraping real exporters -----------------------------------------------

class Synthetic:
    """Four exporters (one per role, as four processes would be) fed an overload every 0.2 s:
    half the requests miss their SLO, most are rejected, KV is 97% full on the prefill instance,
    leases expire, no decode instance is alive in the kvstore, RPCs fail with UNAVAILABLE, the decode
    instance replaces a dead worker every tick."""

    def __init__(self) -> None:
        self.metrics = {role: Metrics(new_registry(), role=role, pool=POOL, instance=f"{role}-0",
                                      model_name="" if role == "kvstore" else "smol")
                        for role in ("router", "prefill", "decode", "kvstore")}
        self.servers = [serve_metrics(0, m.registry) for m in self.metrics.values()]
        self.metrics["router"].set_slo_targets({"short": 2.0, "medium": 20.0, "long": 120.0,
                                                "xlong": 600.0}, 0.1, 0.99)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.ticks = 0

    @property
    def targets(self) -> list[str]:
        return [f"127.0.0.1:{s.port}" for s in self.servers]

    def tick(self) -> None:
        r, p, d, k = (self.metrics[x] for x in ("router", "prefill", "decode", "kvstore"))
        for i, prompt in enumerate((100, 20_000, 300_000, 2_000_000)):
            slow = (self.ticks + i) % 2 == 0
            r.observe_request_done(RequestTiming(
                prompt, 5, "stop", 6.0 if slow else 1.0, ttft_s=5.0 if slow else 0.3, queue_s=0.05,
                ttft_slo_s=1.0, tbt_slo_s=0.1, token_gaps_s=(0.3,) * 4 if slow else (0.02,) * 4))
        r.observe_admission("admitted", "fits")
        r.observe_admission("queued", "kv_full")
        for _ in range(2):
            r.observe_admission("rejected", "ttft_slo")
        r.set_admission_queue(3)
        for role, ratio, overhead in (("prefill", 1.2, 0.05), ("decode", 0.8, 0.01)):
            r.set_ttft_correction(role, ratio, overhead)
            r.set_host_contention(role, 1.7 if role == "decode" else 1.0)
            r.set_load_factor(role, 1.4 if role == "decode" else 1.1)
        for _ in range(3):
            r.observe_rpc_error("/mnemosyne.v1.Router/Generate", grpc.StatusCode.UNAVAILABLE)
        r.observe_retry("WorkerFailedError")
        r.observe_prefix_route("prefill", 4096)
        r.observe_prefix_route("miss", 0)
        for m, role in ((p, "prefill"), (d, "decode")):
            decode = role == "decode"
            m.observe_iteration(0.03 if decode else 0.1, 16 if decode else 2,
                                chunk_tokens=(64,) if decode else (512, 256),
                                generated_tokens=15 if decode else 0)
            m.set_scheduler_load(queued_prefill_tokens=300 if decode else 5000,
                                 running_decodes=15 if decode else 0, waiting_requests=1,
                                 model_scale=0.75 if decode else None)
            for group in (0, 1):
                for tp in (0, 1):
                    m.set_kv_blocks(group, tp, used=50 if decode else 97, free=50 if decode else 3,
                                    quarantined=2 if decode and group == 1 else 0)
            m.set_kv_layout(16, 4096 if decode else 0)
            m.observe_queue_time(0.1)
            m.observe_prefix_cache(1000, 600 if decode else 0)
            for backend in ("nixl", "tcp"):
                m.observe_kv_transfer(backend, "recv" if decode else "send", 1 << 20, 0.02)
            m.observe_kv_transfer("tcp", "recv" if decode else "send", 0, 5.0, ok=False)
            if decode:
                m.observe_worker_replacements(1)          # a worker that keeps dying
        k.observe_reservation(None)
        k.observe_reservation(CapacityError("full"))
        k.add_lease_expiries(1)
        k.set_placements(7)
        k.set_live_instances("decode", 0)
        k.set_live_instances("prefill", 1)
        self.ticks += 1

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.tick()

    def start(self) -> "Synthetic":
        self.tick()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for s in self.servers:
            s.close()


class Prometheus:
    """/usr/bin/prometheus on a free loopback port with the repository's scrape job and rules,
    1 s scrape and evaluation intervals, targets from a file_sd file, storage in tmp_path."""

    def __init__(self, tmp: pathlib.Path, targets: list[str]) -> None:
        config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
        config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
        config["rule_files"] = [str(DEPLOY / f) for f in config["rule_files"]]
        [job] = config["scrape_configs"]
        [sd] = job["file_sd_configs"]
        (tmp / "targets").mkdir()
        (tmp / "targets/synthetic.json").write_text(json.dumps([{"targets": targets}]))
        sd.update(files=[str(tmp / "targets/*.json")], refresh_interval="1s")
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(tmp / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=tmp)
        self.tmp = tmp

    def get(self, path: str, **params) -> dict:
        url = f"{self.url}{path}" + ("?" + urllib.parse.urlencode(params) if params else "")
        with urllib.request.urlopen(url, timeout=5) as resp:
            body = json.loads(resp.read().decode())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.get("/api/v1/query", query=expr)["result"]

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited: {(self.tmp / 'prometheus.log').read_text()}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as resp:
                    if resp.status == 200:
                        return
            time.sleep(0.2)
        raise AssertionError(f"prometheus not ready in {timeout_s}s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.log.close()


def wait_for(what: str, check, timeout_s: float, interval_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(interval_s)


@pytest.fixture(scope="module")
def prom(tmp_path_factory):
    if not (pathlib.Path(PROMETHEUS).exists() and pathlib.Path(PROMTOOL).exists()):
        pytest.skip("prometheus not installed (scripts/setup.sh installs the Debian package)")
    synthetic = Synthetic().start()
    server = Prometheus(tmp_path_factory.mktemp("prometheus"), synthetic.targets)
    try:
        server.wait_ready()

        def all_up():
            active = server.get("/api/v1/targets")["activeTargets"]
            return len(active) == 4 and all(t["health"] == "up" for t in active)
        assert wait_for("targets up", all_up, 20), server.get("/api/v1/targets")
        yield server
    finally:
        server.stop()
        synthetic.stop()


def all_expressions() -> list[tuple[str, str]]:
    out = [(where, grafana_to_promql(e, pool=POOL)) for where, e in dashboard_exprs()]
    for r in rules():
        out.append((f"{r['file']} {r.get('record') or r.get('alert')} (expr)", r["expr"]))
        if "record" in r:
            sel = ",".join(f'{k}="{v}"' for k, v in r.get("labels", {}).items())
            out.append((f"{r['file']} {r['record']} (recorded)", f"{r['record']}{{{sel}}}"))
    out += [(f"admission PrometheusSource {k}", q) for k, q in PrometheusSource(
        "http://unused", pool=POOL).queries().items()]
    return out


@needs_prometheus
def test_every_dashboard_rule_and_admission_expression_returns_data(prom):
    exprs = all_expressions()
    assert len(exprs) > 80
    missing = dict(exprs)

    def poll():
        for where in list(missing):
            # data = at least one series with a number (a NaN quantile or 0/0 ratio is no data)
            if any(r["value"][1] not in ("NaN", "+Inf", "-Inf") for r in prom.query(missing[where])):
                del missing[where]
        return not missing
    wait_for("every expression", poll, 30, interval_s=1.0)
    assert not missing, "no data for:\n" + "\n".join(f"  {w}: {e}" for w, e in missing.items())


@needs_prometheus
def test_every_rule_evaluates_and_every_alert_trips_on_the_overload(prom):
    names = {r["alert"] for r in rules() if "alert" in r}

    def tripped():
        alerts = prom.get("/api/v1/alerts")["alerts"]
        return {a["labels"]["alertname"] for a in alerts if a["state"] in ("pending", "firing")}
    wait_for("alerts", lambda: tripped() >= names, 30)
    assert tripped() >= names, f"not tripped: {names - tripped()}"
    groups = prom.get("/api/v1/rules")["groups"]
    evaluated = [r for g in groups for r in g["rules"]]
    assert len(evaluated) == len(rules())
    assert [r["name"] for r in evaluated if r["health"] != "ok"] == []
    fast = [a for a in prom.get("/api/v1/alerts")["alerts"]
            if a["labels"]["alertname"] == "MnemosyneErrorBudgetBurnFast"]
    assert {a["labels"]["slo"] for a in fast} == {"ttft", "tbt"}
    assert all(a["labels"]["pool"] == POOL and a["labels"]["severity"] == "page" for a in fast)
    # the burn rate is what the synthetic load makes it: half the requests miss, budget 1%
    [burn] = prom.query(f'pool_slo:mnemosyne_slo_error_budget:burn_rate5m{{pool="{POOL}",slo="ttft"}}')
    assert float(burn["value"][1]) == pytest.approx(50.0, rel=0.2)


@needs_prometheus
def test_services_keep_their_own_instance_labels(prom):
    got = {(r["metric"]["role"], r["metric"]["instance"])
           for r in prom.query(f'mnemosyne_active_requests{{pool="{POOL}"}}')}
    assert got == {(role, f"{role}-0") for role in ("router", "prefill", "decode", "kvstore")}


@needs_prometheus
def test_admission_reads_the_load_through_prometheus(prom):
    snap = PrometheusSource(prom.url, pool=POOL, window="30s").scrape()
    assert snap.errors == {}
    prefill, decode = snap.loads["prefill-0"], snap.loads["decode-0"]
    fresh = {l.instance_id for l in snap.fresh(time.monotonic(), 5.0)}
    assert {"prefill-0", "decode-0"} <= fresh
    assert (prefill.role, prefill.queued_prefill_tokens, prefill.kv_free_blocks) == ("prefill", 5000, (3, 3))
    assert (decode.running_decodes, decode.kv_block_size, decode.kvp_tokens) == (15, 16, 4096)
    assert decode.kv_used_blocks == (50, 50)
    assert decode.iteration_s == pytest.approx(0.03) and prefill.iteration_s == pytest.approx(0.1)
    assert decode.model_scale == pytest.approx(0.75) and prefill.model_scale is None   # (never set)


# ---- the kvstore's own metrics (a real kvstore over the session's redis-server) ----------------

def test_kvstore_exports_reservations_placements_instances_and_lease_expiries(redis_url):
    import asyncio

    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from common.rpc import client
    from common.rpc.protos import kvstore_pb2 as pb
    from common.rpc.protos import kvstore_pb2_grpc
    from services.kvstore.config import KVStoreConfig
    from services.kvstore.service import KVStoreService

    def value(registry, name, **labels):
        for family in text_string_to_metric_families(generate_latest(registry).decode()):
            for smp in family.samples:
                if smp.name == name and labels.items() <= smp.labels.items():
                    return smp.value
        return None

    async def scenario():
        deployment = f"metrics-{time.monotonic_ns()}"
        svc = await KVStoreService.start(KVStoreConfig(port=0, redis_url=redis_url, lease_s=0.3,
                                                       reap_interval_s=0.05, grace_s=0.5,
                                                       deployment=deployment))
        try:
            async with client.aio_channel(svc.address) as ch:
                stub = kvstore_pb2_grpc.KVStoreStub(ch)
                await stub.RegisterInstance(pb.RegisterInstanceRequest(instance=pb.InstanceInfo(
                    instance_id="d0", role=pb.ROLE_DECODE, address="127.0.0.1:7000", block_size=16,
                    kvp_tokens=64, capacity_blocks=[6, 6])))
                await stub.Reserve(pb.ReserveRequest(request_id="r1", num_tokens=100))   # 4 + 3 blocks
                # never fits (INVALID_ARGUMENT); fits an empty instance (4 + 4 blocks), not now
                # (RESOURCE_EXHAUSTED)
                for rid, n, new in (("big", 10_000, 0), ("full", 120, 8)):
                    with pytest.raises(grpc.aio.AioRpcError):
                        await stub.Reserve(pb.ReserveRequest(request_id=rid, num_tokens=n,
                                                             max_new_tokens=new))
            registry = svc.metrics.registry
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not value(
                    registry, "mnemosyne_kvstore_lease_expiries_total"):
                await asyncio.sleep(0.1)           # r1 is never renewed: its lease expires
            body = await asyncio.to_thread(
                lambda: urllib.request.urlopen(svc.metrics_server.url, timeout=5).read().decode())
            return registry, body, deployment
        finally:
            await svc.stop()

    registry, body, deployment = asyncio.run(scenario())
    assert value(registry, "mnemosyne_kvstore_reservations_total", outcome="reserved") == 1
    assert value(registry, "mnemosyne_kvstore_reservations_total", outcome="invalid") == 1
    assert value(registry, "mnemosyne_kvstore_reservations_total", outcome="no_capacity") == 1
    assert value(registry, "mnemosyne_kvstore_lease_expiries_total") == 1
    assert value(registry, "mnemosyne_kvstore_placements") == 0
    assert value(registry, "mnemosyne_kvstore_live_instances", member_role="decode") == 1
    assert f'pool="{deployment}"' in body and 'role="kvstore"' in body
