"""Every manifest in cluster/ parses, has the fields its system needs, runs a real gigamamba command,
installs what pyproject.toml declares, and carries no secrets."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from gigamamba.cli import COMMANDS
from gigamamba.cluster.ray_start import DEFAULT_PRELOAD

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _yaml(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def _ray_pin() -> str:
    for dep in PYPROJECT["project"]["dependencies"]:
        m = re.match(r"ray(\[[^\]]*\])?==([\w.]+)$", dep.replace(" ", ""))
        if m:
            return m.group(2)
    raise AssertionError("pyproject.toml does not pin ray")


def gigamamba_command(command: str) -> list[str]:
    """The gigamamba argv inside a shell command line (`gigamamba X ...` or `python -m gigamamba X ...`)."""
    tokens = shlex.split(command)
    for i, tok in enumerate(tokens):
        if tok == "gigamamba" or tok.endswith("/gigamamba"):
            if i >= 2 and tokens[i - 1] == "-m" and "python" not in Path(tokens[i - 2]).name:
                continue
            return tokens[i + 1:]
    raise AssertionError(f"not a gigamamba command: {command!r}")


def assert_real_command(argv: list[str], where: str) -> None:
    assert argv, f"{where}: no gigamamba subcommand"
    assert argv[0] in COMMANDS, f"{where}: {argv[0]!r} is not a gigamamba command ({sorted(COMMANDS)})"


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def _gpu_limit(group: dict) -> int:
    return max(int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) for c in _containers(group["template"]))


def check_ray_cluster_spec(spec: dict, where: str) -> None:
    assert spec["rayVersion"] == _ray_pin(), f"{where}: rayVersion {spec['rayVersion']} != pyproject's ray {_ray_pin()}"
    assert spec.get("enableInTreeAutoscaling") is True, f"{where}: autoscaling is off"
    head = spec["headGroupSpec"]
    # KubeRay passes rayStartParams as strings; an int 0 is rejected by the CRD.
    assert head["rayStartParams"].get("num-cpus") == "0", f"{where}: head must be CPU-less (num-cpus: \"0\")"
    head_containers = _containers(head["template"])
    assert head_containers and all(c.get("image") for c in head_containers)
    assert all("nvidia.com/gpu" not in c.get("resources", {}).get("limits", {}) for c in head_containers)
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    gpu = [g for g in groups.values() if _gpu_limit(g) > 0]
    cpu = [g for g in groups.values() if _gpu_limit(g) == 0]
    assert gpu, f"{where}: no worker group with nvidia.com/gpu limits"
    assert cpu, f"{where}: no CPU worker group for decoding"
    for g in groups.values():
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], f"{where}: group {g['groupName']} replicas"
        for c in _containers(g["template"]):
            assert c.get("image"), f"{where}: group {g['groupName']} has a container without image"
            res = c.get("resources", {})
            # The GPU request must equal the limit (Kubernetes refuses extended-resource overcommit).
            if "nvidia.com/gpu" in res.get("limits", {}):
                assert res.get("requests", {}).get("nvidia.com/gpu", res["limits"]["nvidia.com/gpu"]) == res["limits"]["nvidia.com/gpu"]
    for g in gpu:
        assert g["maxReplicas"] > g["minReplicas"], f"{where}: GPU group {g['groupName']} cannot autoscale"


def test_raycluster():
    doc = _yaml("raycluster.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    assert doc["metadata"]["name"]
    check_ray_cluster_spec(doc["spec"], "raycluster.yaml")


def test_rayjob_runs_a_real_pipeline():
    doc = _yaml("rayjob.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    assert doc["metadata"]["name"]
    spec = doc["spec"]
    check_ray_cluster_spec(spec["rayClusterSpec"], "rayjob.yaml")
    assert spec.get("shutdownAfterJobFinishes") is True
    argv = gigamamba_command(spec["entrypoint"])
    assert_real_command(argv, "rayjob.yaml entrypoint")
    assert argv[0] == "run", "the RayJob runs the whole pipeline (gigamamba run)"
    pipeline = ROOT / argv[1]
    assert re.fullmatch(r"pipelines/[\w-]+\.yaml", argv[1]) and pipeline.is_file(), f"{argv[1]} is not a pipeline spec in the repo"
    from gigamamba.spec import load_spec

    load_spec(pipeline)  # the spec it names must load
    if "runtimeEnvYAML" in spec:
        assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)


def test_rayjob_state_is_shared():
    """The pipeline the RayJob runs, with its --set overrides, passes the cluster shared-state check."""
    from gigamamba.cli import build_parser
    from gigamamba.cluster import check_shared_state
    from gigamamba.commands.train import overrides_from_args
    from gigamamba.spec import load_spec

    command = _yaml("rayjob.yaml")["spec"]["entrypoint"]
    assert "$MLFLOW_TRACKING_URI" in command  # from the Secret, never a literal
    argv = gigamamba_command(command.replace("$MLFLOW_TRACKING_URI", "http://mlflow.mlflow.svc:5000"))
    args = build_parser(argv).parse_args(argv)
    spec = load_spec(ROOT / args.spec, overrides_from_args(args))
    check_shared_state(spec)
    # and without the overrides the same spec is refused: the check is what keeps the manifest honest
    from gigamamba.spec import SpecError

    with pytest.raises(SpecError):
        check_shared_state(load_spec(ROOT / args.spec))


def test_rayjob_entrypoint_parses_with_the_cli():
    """The entrypoint's arguments are accepted by the real argument parser of that subcommand."""
    from gigamamba.cli import build_parser

    argv = gigamamba_command(_yaml("rayjob.yaml")["spec"]["entrypoint"])
    args = build_parser(argv).parse_args(argv)
    assert args.command == argv[0]


def test_launcher_yaml():
    doc = _yaml("launcher-aws-gpu.yaml")
    for key in ("cluster_name", "max_workers", "provider", "auth", "available_node_types", "head_node_type",
                "head_start_ray_commands", "worker_start_ray_commands"):
        assert key in doc, f"launcher-aws-gpu.yaml: missing {key}"
    types = doc["available_node_types"]
    assert doc["head_node_type"] in types
    assert types[doc["head_node_type"]]["resources"].get("CPU") == 0, "the head takes no tasks"
    workers = [t for name, t in types.items() if name != doc["head_node_type"]]
    assert workers and all(0 <= t["min_workers"] <= t["max_workers"] <= doc["max_workers"] for t in workers)
    gpu_types = [t for t in workers if re.match(r"(g|p)\d", t["node_config"]["InstanceType"])]
    assert gpu_types, "no GPU VM type"
    assert any("--head" in c for c in doc["head_start_ray_commands"])
    assert any("--address" in c for c in doc["worker_start_ray_commands"])
    assert doc["docker"]["image"] == _image_tag()
    # The dashboard (Jobs API) is reached through `ray dashboard`'s tunnel, not opened to the network.
    assert "--dashboard-host=127.0.0.1" in " ".join(doc["head_start_ray_commands"])


def _image_tag() -> str:
    return _containers(_yaml("raycluster.yaml")["spec"]["headGroupSpec"]["template"])[0]["image"]


def test_images_agree():
    images = set()
    for name in ("raycluster.yaml", "rayjob.yaml"):
        doc = _yaml(name)
        spec = doc["spec"].get("rayClusterSpec", doc["spec"])
        for tpl in [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]:
            images |= {c["image"] for c in _containers(tpl)}
    assert images == {_image_tag()}
    assert _image_tag().endswith(":" + PYPROJECT["project"]["version"])


SBATCH = CLUSTER / "slurm-symmetric-run.sbatch"


def test_slurm_script_syntax_and_entrypoint():
    text = SBATCH.read_text()
    assert text.startswith("#!/bin/bash")
    assert re.search(r"^#SBATCH --nodes=\d+", text, re.M)
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)
    # The srun line, joined across its backslash continuations.
    joined = re.sub(r"\\\n\s*", " ", text)
    line = next(ln for ln in joined.splitlines() if "ray symmetric-run" in ln and not ln.lstrip().startswith("#"))
    before, sep, after = line.partition(" -- ")
    assert sep, "ray symmetric-run needs `--` between its options and the entrypoint"
    assert "--address" in before
    argv = gigamamba_command(after.replace('"$SPEC"', "pipelines/demo.yaml"))
    assert_real_command(argv, "slurm entrypoint")
    # exported before srun, so every node's `ray symmetric-run` workers preload torch
    export = re.search(r'^export RAY_preload_python_modules="\$\{RAY_preload_python_modules:-(\S+)\}"', text, re.M)
    assert export and text.index(export.group(0)) < text.index("srun --nodes")
    assert set(export.group(1).split(",")) == set(DEFAULT_PRELOAD)


def test_slurm_script_exports_the_preload_to_ray(tmp_path):
    """Run the script with stand-in scontrol and srun: the `ray symmetric-run` srun sees the preload setting
    (an export inside a $(...) would set it in a subshell only)."""
    import os

    seen = tmp_path / "seen"
    (tmp_path / "scontrol").write_text("#!/bin/bash\necho node1\n")
    (tmp_path / "srun").write_text(
        "#!/bin/bash\n"
        'if [[ " $* " == *" hostname "* ]]; then echo 10.0.0.1; exit 0; fi\n'
        f'echo "${{RAY_preload_python_modules:-unset}}" > {shlex.quote(str(seen))}\n')
    for f in ("scontrol", "srun"):
        (tmp_path / f).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "RAY_preload_python_modules"}
    env.update(PATH=f"{tmp_path}:{env.get('PATH', '/usr/bin:/bin')}", SLURM_JOB_NODELIST="node1",
               SLURM_JOB_NUM_NODES="1", SLURM_CPUS_PER_TASK="4", SLURM_GPUS_PER_TASK="1")
    subprocess.run(["bash", str(SBATCH)], env=env, check=True, cwd=tmp_path, timeout=60)
    assert set(seen.read_text().strip().split(",")) == set(DEFAULT_PRELOAD)


def test_slurm_options_exist_in_installed_ray():
    """Each option the script gives `ray symmetric-run` is one that this Ray's symmetric-run or start knows."""
    ray_bin = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")
    assert ray_bin, "ray CLI not installed"
    joined = re.sub(r"\\\n\s*", " ", SBATCH.read_text())
    line = next(ln for ln in joined.splitlines() if "ray symmetric-run" in ln and not ln.lstrip().startswith("#"))
    opts = set(re.findall(r"(--[a-z][a-z-]+)", line.partition(" -- ")[0].partition("ray symmetric-run")[2]))
    help_text = subprocess.run([ray_bin, "symmetric-run", "--help"], capture_output=True, text=True).stdout
    help_text += subprocess.run([ray_bin, "start", "--help"], capture_output=True, text=True).stdout
    assert opts, "no options found"
    for opt in opts:
        assert re.search(rf"{re.escape(opt)}\b", help_text), f"ray symmetric-run does not know {opt}"


DOCKERFILE = CLUSTER / "Dockerfile"


def _docker_instructions() -> list[tuple[str, str]]:
    # Docker drops comment lines before joining continuations, even inside one instruction.
    lines = [ln for ln in DOCKERFILE.read_text().splitlines() if not ln.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines) + "\n")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_installs_the_project_and_builds_the_extension():
    ins = _docker_instructions()
    assert ins[0][0] == "FROM" and "devel" in ins[0][1], "the extension needs a CUDA devel base (nvcc)"
    copies = [rest.split() for word, rest in ins if word == "COPY"]
    for args in copies:
        for src in args[:-1]:
            assert (ROOT / src).exists(), f"Dockerfile copies {src}, which is not in the repo"
    copied = {Path(src).name for args in copies for src in args[:-1]}
    for needed in ("pyproject.toml", "gigamamba", "csrc"):
        assert needed in copied, f"Dockerfile never copies {needed}"
    runs = " && ".join(rest for word, rest in ins if word == "RUN")
    steps = [s.strip() for s in re.split(r"&&|;", runs)]
    # `pip install .` with dependencies installs exactly what pyproject.toml declares.
    installs = [s for s in steps if re.match(r"pip install\b", s) and re.search(r"\s\.(\s|$)", s + " ")]
    assert any("--no-deps" not in s for s in installs), "the project's dependencies are never installed from pyproject.toml"
    assert not any(re.match(r"pip install\s+(?!--|\.)", s) for s in steps if "--upgrade pip" not in s), \
        "packages installed outside pyproject.toml"
    build = [i for i, s in enumerate(steps) if s.startswith("gigamamba build-ext")]
    final_install = max(i for i, s in enumerate(steps) if s in installs)
    assert build and build[-1] > final_install, "gigamamba build-ext must run after the project is installed"
    assert "build-ext" in COMMANDS
    env = " ".join(rest for word, rest in ins if word == "ENV")
    assert "TORCH_CUDA_ARCH_LIST" in env, "without an arch list the build needs a GPU at build time"
    # build-ext writes to TORCH_EXTENSIONS_DIR; pinned, so that the runtime user finds the build.
    assert re.search(r"TORCH_EXTENSIONS_DIR=/\S+", env)
    # idle Ray workers on every node preload what encoder actors and Ray Train workers import
    preload = re.search(r"RAY_preload_python_modules=(\S+)", env)
    assert preload and set(preload.group(1).split(",")) == set(DEFAULT_PRELOAD)


def test_dockerfile_declares_pyproject_python():
    """The base image's Python satisfies requires-python (ubuntu24.04 ships 3.12)."""
    req = PYPROJECT["project"]["requires-python"]
    base = _docker_instructions()[0][1]
    m = re.search(r"ubuntu(\d+)\.(\d+)", base)
    assert m, base
    python_of = {"22.04": (3, 10), "24.04": (3, 12)}
    version = python_of[f"{m.group(1)}.{m.group(2)}"]
    low = tuple(int(x) for x in re.match(r">=\s*(\d+)\.(\d+)", req).groups())
    assert version >= low, f"{base} has Python {version}, pyproject needs {req}"


SECRET_PATTERNS = [
    re.compile(r"AKIA[0-9A-Z]{16}"),                            # AWS access key id
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{20,}"),                  # GitHub tokens
    re.compile(r"\bsk-[A-Za-z0-9]{20,}"),
    re.compile(r"\bxox[abp]-[A-Za-z0-9-]{10,}"),                  # Slack
    re.compile(r"(?i)name:\s*\S*(secret|token|password|key|credential)\S*\s*\n\s*value:\s*\S+"),  # inline k8s env
    re.compile(r"(?i)\b(password|passwd|secret|token|api[_-]?key|access[_-]?key)\b\s*[:=]\s*['\"]?(?!\$|\{|\.\.\.)[A-Za-z0-9/+_\-]{8,}"),
]


def _manifests() -> list[Path]:
    return sorted(p for p in CLUSTER.iterdir() if p.is_file())


@pytest.mark.parametrize("path", _manifests(), ids=lambda p: p.name)
def test_no_secret_literals(path):
    text = path.read_text()
    for pattern in SECRET_PATTERNS:
        m = pattern.search(text)
        assert not m, f"{path.name}: secret-looking literal {m.group(0)!r}"


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_credentials_come_from_secrets(name):
    """A credential-named env var in a pod is filled from a Kubernetes Secret, never written inline."""
    doc = _yaml(name)
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    for tpl in templates:
        for c in _containers(tpl):
            for env in c.get("env", []):
                if re.search(r"(?i)(secret|token|password|key|credential)", env["name"]):
                    assert "value" not in env and "secretKeyRef" in env.get("valueFrom", {}), f"{name}: {env['name']}"
            for src in c.get("envFrom", []):
                assert "secretRef" in src or "configMapRef" in src


def test_secret_scan_catches_a_literal(tmp_path):
    """The scan above is not vacuous: it flags an inline token and an AWS key."""
    planted = "env:\n  - name: MLFLOW_TRACKING_TOKEN\n    value: 'abcd1234efgh5678'\nkey: AKIAABCDEFGHIJKLMNOP\n"
    hits = [p.pattern for p in SECRET_PATTERNS if p.search(planted)]
    assert len(hits) >= 2
    clean = "envFrom:\n  - secretRef: {name: gigamamba-credentials}\ntoken: ${MLFLOW_TRACKING_TOKEN}\n"
    assert not [p.pattern for p in SECRET_PATTERNS if p.search(clean)]
