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
    # the documented way to render says what to do, instead of kustomize's "evalsymlink failure"
    for overlay in ("cpu", "gpu"):
        done = subprocess.run(["bash", str(copy / "render.sh"), overlay], capture_output=True, text=True)
        assert done.returncode == 1 and "run deploy/make-secrets.sh first" in done.stderr, done.stderr
    assert subprocess.run(["bash", str(copy / "render.sh"), "tpu"], capture_output=True).returncode == 2


def test_readme_makes_the_secrets_before_any_render() -> None:
    """The first command of deploy/README that renders or applies comes after the one that makes the keys."""
    commands, fenced = [], False
    for line in (ROOT / "deploy/README.md").read_text().splitlines():
        if line.strip().startswith("```"):
            fenced = not fenced
        elif fenced:
            commands.append(line)
    renders = [i for i, c in enumerate(commands) if re.search(r"kubectl (kustomize|apply)|render\.sh", c)]
    secrets = [i for i, c in enumerate(commands) if "make-secrets.sh" in c]
    assert renders and secrets and secrets[0] < renders[0], (commands[renders[0]] if renders else None)


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_each_overlay_deploys_its_own_image(overlay: str, deploy_copy: Path) -> None:
    """Issue 23.2: the GPU overlay rendered the CPU image, because the base had renamed it before the overlay's
    `images` could match. Every container of ours runs the overlay's image and device."""
    out = subprocess.run(["bash", str(deploy_copy / "render.sh"), overlay], check=True, capture_output=True,
                         text=True).stdout
    objs = [d for d in yaml.safe_load_all(out) if d]
    pods = _pod_specs(objs)
    ours = {name: spec for name, spec in pods.items() if name in ("residual-api", "residual-worker")}
    assert set(ours) == {"residual-api", "residual-worker"}
    for name, spec in ours.items():
        (container,) = spec["containers"]
        assert container["image"] == f"registry.example.com/residual-serve:0.1.0-{overlay}", (name, container["image"])
        gpus = container["resources"]["limits"].get("nvidia.com/gpu")
        assert gpus == (1 if overlay == "gpu" else None), name
    device = next(o for o in objs if o["kind"] == "ConfigMap")["data"]["RESIDUAL_DEVICE"]
    assert device == ("cuda" if overlay == "gpu" else "cpu")
    redis_images = [c["image"] for name, spec in pods.items() if name not in ours for c in spec["containers"]]
    assert redis_images and all(i.startswith("redis:") for i in redis_images)


def test_worker_metrics_are_scraped_on_their_own_port(deploy_copy: Path) -> None:
    from service.settings import Settings

    objs = render("cpu", deploy_copy)
    config = next(o for o in objs if o["kind"] == "ConfigMap")["data"]
    port = int(config["RESIDUAL_WORKER_METRICS_PORT"])
    assert port != 9100 and Settings.model_fields["worker_metrics_port"].default != 9100  # node_exporter's port
    assert config["RESIDUAL_WORKER_METRICS_HOST"] == "0.0.0.0"
    assert Settings.model_fields["worker_metrics_host"].default == "127.0.0.1"  # loopback outside Kubernetes
    worker = _pod_specs(objs)["residual-worker"]["containers"][0]
    assert {"name": "metrics", "containerPort": port} in worker["ports"]
    monitor = next(o for o in objs if o["kind"] == "PodMonitor")
    assert monitor["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": "residual-worker"}
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"


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


def test_a_drift_alert_watches_the_deployment_score(deploy_copy: Path) -> None:
    """The PrometheusRule alerts on the metric the API exports (the README's metrics table names it)."""
    objs = render("cpu", deploy_copy)
    rule = next(o for o in objs if o["kind"] == "PrometheusRule")
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    drift = alerts["ResidualTrafficDrift"]
    assert "residual_drift_score" in drift["expr"] and "by (model)" in drift["expr"]
    threshold = float(drift["expr"].rsplit(">", 1)[1])
    assert 0.2 < threshold < 1  # above the documented in-distribution noise band
    readme = (ROOT / "README.md").read_text()
    for name in ("residual_drift_score", "residual_drift_skipped_images_total"):
        assert f"| `{name}` | API |" in readme


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


def test_the_two_model_overlay_serves_both_models_on_one_gpu(deploy_copy: Path, monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    """The two-model example: RESIDUAL_MODELS parses as the service parses it (the first is the default), the model
    memory budget holds both in fp16, and the pods keep the GPU image and one GPU each."""
    from service.settings import Settings

    objs = render("gpu-two-models", deploy_copy)
    config = next(o for o in objs if o["kind"] == "ConfigMap")["data"]
    for key in ("RESIDUAL_MODELS", "RESIDUAL_MODEL_MEMORY_BYTES"):  # read from the environment, as a pod does
        monkeypatch.setenv(key, config[key])
    settings = Settings()
    specs = settings.model_specs()
    assert [(m.name, m.architecture, m.precision) for m in specs] == [("vit-b-32", "ViT-B-32", "fp16"),
                                                                     ("vit-l-14", "ViT-L-14", "fp16")]
    # parameters in fp16 (2 bytes each): ViT-B-32 ~151 M, ViT-L-14 ~428 M; both fit the budget
    assert settings.model_memory_bytes is not None and settings.model_memory_bytes >= 2 * (151 + 428) * 10**6
    assert config["RESIDUAL_DEVICE"] == "cuda"
    for name in ("residual-api", "residual-worker"):
        (container,) = _pod_specs(objs)[name]["containers"]
        assert container["image"].endswith("-gpu") and container["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_the_base_configmap_is_accepted_by_the_service(deploy_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every RESIDUAL_* entry of the base ConfigMap parses as the service parses it, and its OTEL_* entries are
    accepted by the tracing set-up (images by URL and traces are off as shipped)."""
    from service import tracing
    from service.settings import Settings

    config = next(o for o in render("cpu", deploy_copy) if o["kind"] == "ConfigMap")["data"]
    for key, value in config.items():
        if key.startswith(("RESIDUAL_", "OTEL_")):
            monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.image_url_allowlist == [] and str(settings.artifact_dir) == config["RESIDUAL_ARTIFACT_DIR"]
    assert config["OTEL_TRACES_EXPORTER"] == "none" and tracing.configure("residual-serve") is False
