"""Grafana dashboards and Prometheus rules under deploy/: valid files, and every PromQL expression
references only metrics that common/metrics.py defines (or series the recording rules define from
them). The helpers that extract expressions are shared with test_prometheus.py, which runs every
expression against a real Prometheus."""
from __future__ import annotations

import json
import pathlib
import re

import pytest
import yaml

from common.metrics import SPECS, exposed_names

ROOT = pathlib.Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((ROOT / "deploy/grafana/dashboards").glob("*.json"))
RULE_FILES = sorted((ROOT / "deploy/prometheus/rules").glob("*.yml"))
METRICS = {n for s in SPECS for n in exposed_names(s)}
PER_MODEL = {n for s in SPECS if s.per_model for n in exposed_names(s)}     # labelled with model_name

_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGES = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_NUMBERS = re.compile(r"(?<![\w:.])\d[\w.]*")
_IDENT = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
             "bool", "offset", "inf", "nan", "Inf", "NaN"}


def grafana_to_promql(expr: str, pool: str = ".*", rate_interval: str = "1m", model_name: str = ".*") -> str:
    """A panel query as Prometheus receives it from Grafana (template variables substituted; the
    model variable's "All" is .*)."""
    return (expr.replace("$__rate_interval", rate_interval).replace("$__interval", rate_interval)
            .replace("${pool}", pool).replace("$pool", pool).replace("$model_name", model_name))


def metric_names(expr: str) -> set[str]:
    """Metric (series) names a PromQL expression selects; functions, keywords, label names,
    strings, durations and numbers are left out."""
    e = _STRINGS.sub('""', grafana_to_promql(expr))
    e = _MATCHERS.sub("", e)
    e = _RANGES.sub("", e)
    e = _GROUPING.sub("", e)
    e = _NUMBERS.sub("", e)
    names = set()
    for m in _IDENT.finditer(e):
        rest = e[m.end():].lstrip()
        if m.group() in _KEYWORDS or rest.startswith("("):
            continue
        names.add(m.group())
    return names


def walk_panels(panels: list[dict]):
    for p in panels:
        yield p
        yield from walk_panels(p.get("panels", []))


def dashboard_exprs() -> list[tuple[str, str]]:
    """(where, expr) for every query of every panel of every dashboard."""
    out = []
    for path in DASHBOARDS:
        for p in walk_panels(json.loads(path.read_text())["panels"]):
            for t in p.get("targets", []):
                out.append((f"{path.name}: {p['title']} [{t['refId']}]", t["expr"]))
    return out


def rules() -> list[dict]:
    """Every rule of every rule file, with `file` and `group` added."""
    out = []
    for path in RULE_FILES:
        for g in yaml.safe_load(path.read_text())["groups"]:
            out += [{**r, "file": path.name, "group": g["name"]} for r in g["rules"]]
    return out


def recorded_names() -> set[str]:
    return {r["record"] for r in rules() if "record" in r}


@pytest.fixture(scope="module", params=[p.name for p in DASHBOARDS])
def dashboard(request):
    return json.loads((ROOT / "deploy/grafana/dashboards" / request.param).read_text())


def test_there_is_a_dashboard_and_rule_files():
    assert [p.name for p in DASHBOARDS] == ["mnemosyne-slo.json"]
    assert {p.name for p in RULE_FILES} == {"recording.yml", "alerts.yml"}


def test_dashboard_structure(dashboard):
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["pool"]["type"] == "query"
    assert variables["model_name"]["type"] == "query" and variables["model_name"]["allValue"] == ".*"
    assert metric_names(re.sub(r"label_values\((\w+),.*", r"\1", variables["pool"]["query"]["query"])) <= METRICS
    panels = list(walk_panels(dashboard["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        if p["type"] == "row":
            continue
        assert p["title"] and p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["fieldConfig"]["defaults"]["unit"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["expr"].strip() and t["datasource"]["uid"] == "${datasource}", p["title"]
    # no two panels overlap
    cells = set()
    for p in panels:
        g = p["gridPos"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"panel {p['title']} overlaps another"
        cells |= mine


def test_every_panel_query_uses_only_defined_metrics_and_filters_by_pool():
    exprs = dashboard_exprs()
    assert len(exprs) >= 30
    for where, expr in exprs:
        names = metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        assert names <= METRICS, f"{where}: {sorted(names - METRICS)} not defined in common/metrics.py"
        # every selector is restricted to the dashboard's pool, and a request-level family's to its model
        selectors = re.findall(r"mnemosyne_\w+(\{[^}]*\})?", expr)
        assert selectors and all('pool=~"$pool"' in s for s in selectors), f"{where}: {expr}"
        for name, sel in re.findall(r"(mnemosyne_\w+)(\{[^}]*\})", expr):
            assert ('model_name=~"$model_name"' in sel) == (name in PER_MODEL), f"{where}: {name}{sel}"


def test_every_rule_expression_uses_only_defined_metrics_or_recorded_series():
    known = METRICS | recorded_names()
    for r in rules():
        names = metric_names(r["expr"])
        assert names and names <= known, f"{r['file']} {r.get('record') or r.get('alert')}: " \
                                         f"{sorted(names - known)} unknown"
    for name in recorded_names():
        level, metric, op = name.split(":")
        assert level and metric.startswith("mnemosyne_") and op, name


def test_dashboard_covers_the_slo_views():
    """Per pool: TTFT and TBT percentiles with SLO lines, SLO attainment, error-budget burn,
    throughput, queue, KV usage, transfer bandwidth, admission decisions."""
    panels = {}
    for where, expr in dashboard_exprs():
        panel = where.split(": ", 1)[1].rsplit(" [", 1)[0]
        panels.setdefault(panel, []).append(expr)

    def panel_with(*needles):
        found = [t for t, exprs in panels.items() if all(any(n in e for e in exprs) for n in needles)]
        assert found, f"no panel queries all of {needles}"
        return found

    panel_with("histogram_quantile(0.99", "mnemosyne_time_to_first_token_seconds_bucket",
               'mnemosyne_slo_target_seconds{pool=~"$pool", slo="ttft"}')
    panel_with("histogram_quantile(0.99", "mnemosyne_time_between_tokens_seconds_bucket",
               'mnemosyne_slo_target_seconds{pool=~"$pool", slo="tbt"}')
    panel_with('result="met"', "mnemosyne_slo_objective_ratio")                     # attainment
    panel_with('result="missed"', "[5m]", "[1h]", "1 - max by (slo) (mnemosyne_slo_objective_ratio")
    panel_with("mnemosyne_tokens_total")
    panel_with("mnemosyne_requests_finished_total")
    panel_with("mnemosyne_admission_queued_requests", "mnemosyne_scheduler_waiting_requests")
    panel_with("mnemosyne_kv_blocks_used", "mnemosyne_kv_blocks_free")
    panel_with("rate(mnemosyne_kv_transfer_bytes_total")
    panel_with("mnemosyne_admission_decisions_total")


def test_every_metric_is_shown_or_used_by_a_rule():
    used = set()
    for _, expr in dashboard_exprs():
        used |= metric_names(expr)
    for r in rules():
        used |= metric_names(r["expr"])
    # read by admission (common/admission.py) to turn tokens into blocks per KVP group
    for_admission = {"mnemosyne_kv_block_size_tokens", "mnemosyne_kvp_group_tokens"}
    for s in SPECS:
        if s.name not in for_admission:
            assert set(exposed_names(s)) & used, f"{s.name} is neither on a dashboard nor in a rule"


def test_grafana_provisioning_points_at_the_dashboards():
    prov = ROOT / "deploy/grafana/provisioning"
    ds = yaml.safe_load((prov / "datasources/prometheus.yml").read_text())
    assert ds["apiVersion"] == 1
    [source] = ds["datasources"]
    assert source["type"] == "prometheus" and source["uid"] and source["url"]
    dash = yaml.safe_load((prov / "dashboards/mnemosyne.yml").read_text())
    [provider] = dash["providers"]
    assert provider["type"] == "file" and provider["options"]["path"].endswith("/mnemosyne")


def test_metric_name_extraction():
    e = ('histogram_quantile(0.99, sum by (pool, le) (rate(mnemosyne_a_bucket{pool=~"$pool", x="b c"}'
         '[$__rate_interval]))) / on (slo) group_left () (1 - max by (slo) (b:c:d offset 5m)) > 1e3 '
         'and x_total unless bool 14.4')
    assert metric_names(e) == {"mnemosyne_a_bucket", "b:c:d", "x_total"}
