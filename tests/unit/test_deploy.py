"""Deployment artefacts: the kustomize overlays rendered with kubectl, the Dockerfile's rules, compose."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def _kubectl() -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is not installed, and it renders deploy/k8s (kustomize is built in): install it, e.g. "
                    "`apt-get install kubectl` or the static binary from dl.k8s.io", pytrace=False)
    return kubectl


@pytest.fixture(scope="module")
def deploy_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """deploy/ copied with a secrets.env made by deploy/make-secrets.sh (as an operator would)."""
    copy = tmp_path_factory.mktemp("deploy") / "deploy"
    shutil.copytree(ROOT / "deploy", copy, ignore=shutil.ignore_patterns("secrets.env"))
    subprocess.run(["bash", str(copy / "make-secrets.sh")], check=True, capture_output=True)
    return copy


def render(overlay: str, deploy: Path) -> list[dict]:
    out = subprocess.run([_kubectl(), "kustomize", str(deploy / "k8s/overlays" / overlay)], check=True,
                         capture_output=True, text=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def test_rendering_without_generated_secrets_fails(tmp_path: Path) -> None:
    copy = tmp_path / "deploy"
    shutil.copytree(ROOT / "deploy", copy, ignore=shutil.ignore_patterns("secrets.env"))
    done = subprocess.run([_kubectl(), "kustomize", str(copy / "k8s/overlays/cpu")], capture_output=True, text=True)
    assert done.returncode != 0 and "secrets.env" in done.stderr


def test_generated_secrets_are_real_keys(deploy_copy: Path) -> None:
    from service.settings import Settings

    env = dict(line.split("=", 1) for line in (deploy_copy / "k8s/base/secrets.env").read_text().splitlines())
    assert (deploy_copy / "k8s/base/secrets.env").stat().st_mode & 0o077 == 0  # only the owner reads it
    Settings(api_key=env["RESIDUAL_API_KEY"], admin_api_key=env["RESIDUAL_ADMIN_API_KEY"])  # accepted at start
    assert env["RESIDUAL_API_KEY"] != env["RESIDUAL_ADMIN_API_KEY"]
    assert f":{env['REDIS_PASSWORD']}@" in env["RESIDUAL_REDIS_URL"]
    assert subprocess.run(["bash", str(deploy_copy / "make-secrets.sh")], capture_output=True).returncode != 0
    tracked = subprocess.run(["git", "ls-files", "deploy"], cwd=ROOT, capture_output=True, text=True).stdout
    assert "secrets.env" not in tracked
    assert "change-me" not in "".join(p.read_text() for p in (ROOT / "deploy/k8s").rglob("*.yaml"))


def _pod_specs(objs: list[dict]) -> dict[str, dict]:
    return {o["metadata"]["name"]: o["spec"]["template"]["spec"] for o in objs
            if o["kind"] in ("Deployment", "StatefulSet")}


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_rendered_objects(overlay: str, deploy_copy: Path) -> None:
    objs = render(overlay, deploy_copy)
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
    # SIGTERM: the API drains for RESIDUAL_SHUTDOWN_TIMEOUT_S; Kubernetes must not SIGKILL it before that ends
    config = next(o for o in objs if o["kind"] == "ConfigMap")["data"]
    from service.settings import Settings

    drain = float(config.get("RESIDUAL_SHUTDOWN_TIMEOUT_S", Settings.model_fields["shutdown_timeout_s"].default))
    assert pods["residual-api"]["terminationGracePeriodSeconds"] >= drain + 10
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
    secret = next(o for o in objs if o["kind"] == "Secret")
    assert secret["metadata"]["name"] == "residual-secrets"
    assert {"REDIS_PASSWORD", "RESIDUAL_API_KEY", "RESIDUAL_ADMIN_API_KEY"} <= set(secret["data"])


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
