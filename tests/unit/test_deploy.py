"""Deployment artefacts: the kustomize overlays rendered with kubectl, the Dockerfile's rules, compose."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def render(overlay: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    assert kubectl is not None, "kubectl (with its built-in kustomize) is needed to render deploy/k8s"
    out = subprocess.run([kubectl, "kustomize", str(ROOT / "deploy/k8s/overlays" / overlay)], check=True,
                         capture_output=True, text=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def _pod_specs(objs: list[dict]) -> dict[str, dict]:
    return {o["metadata"]["name"]: o["spec"]["template"]["spec"] for o in objs
            if o["kind"] in ("Deployment", "StatefulSet")}


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_rendered_objects(overlay: str) -> None:
    objs = render(overlay)
    kinds = sorted(o["kind"] for o in objs)
    for kind in ("ConfigMap", "Secret", "PersistentVolumeClaim", "StatefulSet", "Deployment", "Service",
                 "PodDisruptionBudget", "HorizontalPodAutoscaler", "ScaledObject", "NetworkPolicy", "ServiceMonitor"):
        assert kind in kinds, kind
    pods = _pod_specs(objs)
    for name, spec in pods.items():
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        for c in spec["containers"]:
            assert c["resources"]["requests"] and c["resources"]["limits"], name
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, name
            assert c["securityContext"]["readOnlyRootFilesystem"] is True, name
            image = c["image"]
            assert re.search(r":[\w.-]+$", image) and not image.endswith(":latest"), image
            gpu = c["resources"]["limits"].get("nvidia.com/gpu")
            if overlay == "gpu" and name in ("residual-api", "residual-worker"):
                assert gpu == 1, name
            else:
                assert gpu is None, name
    api = pods["residual-api"]["containers"][0]
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["livenessProbe"]["httpGet"]["path"] == "/livez"
    budget = api["startupProbe"]["periodSeconds"] * api["startupProbe"]["failureThreshold"]
    assert budget >= 120
    assert pods["residual-worker"]["terminationGracePeriodSeconds"] >= 300
    queue = next(o for o in objs if o["kind"] == "StatefulSet" and o["metadata"]["name"] == "residual-redis-queue")
    args = " ".join(queue["spec"]["template"]["spec"]["containers"][0]["args"])
    assert "--appendonly yes" in args and "--maxmemory-policy noeviction" in args and "--requirepass" in args
    cache = next(o for o in objs if o["kind"] == "StatefulSet" and o["metadata"]["name"] == "residual-redis-cache")
    assert "allkeys-lru" in " ".join(cache["spec"]["template"]["spec"]["containers"][0]["args"])
    pvc = next(o for o in objs if o["kind"] == "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    scaled = next(o for o in objs if o["kind"] == "ScaledObject")
    assert scaled["spec"]["triggers"][0]["metadata"]["listName"] == "rq:queue:residual-fit"
    device = next(o for o in objs if o["kind"] == "ConfigMap")["data"]["RESIDUAL_DEVICE"]
    assert device == ("cuda" if overlay == "gpu" else "cpu")


def test_dockerfile_rules() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2  # multi-stage
    assert re.search(r"^USER 10001", text, re.M)  # non-root
    assert "HF_HUB_OFFLINE=1" in text
    assert re.search(r"^HEALTHCHECK .*", text, re.M) and "/livez" in text
    assert "ARG TARGET" in text and "residual-serve" in text
    assert not re.search(r"^FROM [^\n]*:latest", text, re.M)
    assert not re.search(r"^ADD ", text, re.M)


def test_compose_has_api_worker_redis_and_a_volume() -> None:
    compose = yaml.safe_load((ROOT / "deploy/compose.yaml").read_text())
    assert {"api", "worker", "redis"} <= set(compose["services"])
    assert compose["services"]["worker"]["command"] == ["residual-worker"]
    assert "artifacts" in compose["volumes"]
