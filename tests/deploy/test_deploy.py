"""The deployment files: Kubernetes manifests valid for the API (offline, strict), the
systemd unit accepted by systemd-analyze, and every command line in them accepted by the
real CLI."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from preemptwatch.cli import build_parser

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
REPO = DEPLOY.parent
K8S_VERSION = "1.29.0"
MANIFESTS = sorted((DEPLOY / "kubernetes").glob("*.yaml"))


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc.get("spec", {})
    pod = spec.get("template", {}).get("spec", {})
    return list(pod.get("containers", []))


def expand(args: list[str], env: dict[str, str]) -> list[str]:
    """Kubernetes' $(VAR) expansion, with sample values for secret-backed variables."""
    return [re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), "x"), a) for a in args]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifests_are_valid_kubernetes(path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "kubernetes_validate",
            "--kubernetes-version",
            K8S_VERSION,
            "--strict",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "passed" in result.stdout and "ERROR" not in result.stdout


def test_the_validator_catches_a_broken_manifest(tmp_path: Path) -> None:
    broken = (
        (DEPLOY / "kubernetes" / "sidecar.yaml").read_text().replace("hostNetwork", "hostNetwrk")
    )
    path = tmp_path / "broken.yaml"
    path.write_text(broken)
    result = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "-k", K8S_VERSION, "--strict", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0


def test_sidecar_daemonset_uses_the_host_network_and_probes_its_own_port() -> None:
    docs = documents(DEPLOY / "kubernetes" / "sidecar.yaml")
    ds = next(d for d in docs if d["kind"] == "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    (container,) = containers(ds)
    args = build_parser().parse_args(container["args"])
    assert args.command == "watch" and args.host == "0.0.0.0"
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": args.port}
    assert container["ports"][0]["containerPort"] == args.port
    env = {e["name"]: e for e in container["env"]}
    assert env["PREEMPTWATCH_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "preemptwatch-client"
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert os.path.dirname(env["PREEMPTWATCH_SPOOL_DIR"]["value"]) in mounts


def test_server_deployment_runs_the_server_with_postgres_and_probes() -> None:
    docs = documents(DEPLOY / "kubernetes" / "server.yaml")
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) >= {"Deployment", "Service", "ConfigMap"}
    deployment = kinds["Deployment"]
    assert deployment["spec"]["replicas"] >= 2
    (container,) = containers(deployment)
    env = {e["name"]: e for e in container["env"]}
    sample = {
        "PREEMPTWATCH_DB_URL": "postgresql://u@db:5432/pw",
        "PREEMPTWATCH_STORAGE": "s3://b/p",
    }
    sample["PREEMPTWATCH_HEARTBEAT_TIMEOUT"] = kinds["ConfigMap"]["data"]["heartbeat-timeout"]
    args = build_parser().parse_args(expand(container["args"], sample))
    assert args.command == "server" and args.db.startswith("postgresql://")
    assert args.heartbeat_timeout == 300
    for name in ("PREEMPTWATCH_DB_URL", "PREEMPTWATCH_API_KEY"):
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "preemptwatch-server"
    port = {p["name"]: p["containerPort"] for p in container["ports"]}["http"]
    assert port == args.port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/healthz"
    service = kinds["Service"]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["targetPort"] == "http"


def test_training_example_points_at_the_node_sidecar() -> None:
    (job,) = documents(DEPLOY / "kubernetes" / "training-job-example.yaml")
    (container,) = containers(job)
    env = {e["name"]: e for e in container["env"]}
    assert env["HOST_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
    sidecar = documents(DEPLOY / "kubernetes" / "sidecar.yaml")[1]
    port = containers(sidecar)[0]["ports"][0]["hostPort"]
    assert env["PREEMPTWATCH_SIDECAR_URL"]["value"] == f"http://$(HOST_IP):{port}"


def _unit_for_this_machine(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this machine's preemptwatch (verify checks
    that the binary exists)."""
    exe = shutil.which("preemptwatch")
    assert exe, "preemptwatch is not on PATH"
    text = (DEPLOY / "systemd" / "preemptwatch-watch.service").read_text()
    assert "ExecStart=/usr/local/bin/preemptwatch watch" in text
    unit = tmp_path / "preemptwatch-watch.service"
    unit.write_text(text.replace("/usr/local/bin/preemptwatch", os.path.realpath(exe)))
    return unit


def test_systemd_unit_verifies_without_warnings(tmp_path: Path) -> None:
    unit = _unit_for_this_machine(tmp_path)
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "" and result.stdout.strip() == ""
    bad = tmp_path / "bad.service"
    bad.write_text(unit.read_text().replace("MemoryMax=", "MemoryMaximum="))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert "Unknown key" in result.stderr  # the check above would catch a typo


def test_systemd_unit_runs_the_sidecar_with_its_env_file_arguments() -> None:
    text = (DEPLOY / "systemd" / "preemptwatch-watch.service").read_text()
    assert "StateDirectory=preemptwatch" in text and "Restart=always" in text
    env: dict[str, str] = {}
    for line in (DEPLOY / "systemd" / "preemptwatch-watch.env").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key] = value
    exec_start = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    argv = exec_start.removeprefix("ExecStart=").split()[1:]
    argv = [a for arg in argv for a in (env[arg[1:]].split() if arg.startswith("$") else [arg])]
    args = build_parser().parse_args(argv)
    assert args.command == "watch" and args.signal == "USR1"
    assert args.pid_file == [Path("/run/train/train.pid")]


def test_dockerfile_builds_from_files_that_exist_and_runs_a_real_command() -> None:
    lines = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ").splitlines()
    instructions = [
        line.split(None, 1) for line in lines if line.strip() and not line.startswith("#")
    ]
    known = {"FROM", "WORKDIR", "COPY", "RUN", "ENV", "USER", "EXPOSE", "ENTRYPOINT", "CMD"}
    assert {i[0] for i in instructions} <= known
    for op, rest in instructions:
        if op == "COPY" and "--from" not in rest:
            for source in rest.split()[:-1]:
                assert (REPO / source).exists(), source
    entry = json.loads(next(rest for op, rest in instructions if op == "ENTRYPOINT"))
    cmd = json.loads(next(rest for op, rest in instructions if op == "CMD"))
    assert entry == ["preemptwatch"]
    args = build_parser().parse_args(cmd)
    assert args.command == "server" and args.host == "0.0.0.0"
    exposed = next(rest for op, rest in instructions if op == "EXPOSE").split()
    assert str(args.port) in exposed and "8474" in exposed
    extras = re.findall(r"\[([a-z,]+)\]", (DEPLOY / "Dockerfile").read_text())
    pyproject = (REPO / "pyproject.toml").read_text()
    for extra in {e for group in extras for e in group.split(",")}:
        assert re.search(rf"^{extra} = \[", pyproject, re.M), extra
