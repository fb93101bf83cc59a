"""Hostfiles and cluster settings: bad ones fail with one sentence before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import Rejects
from helpers import run_launcher
from launcher.backends import resolve_hosts
from launcher.compose import compose_config, to_schema
from launcher.errors import ConfigError
from launcher.hostfile import is_plain_host, parse_hostfile
from launcher.validate import validate

MOE = ["model=tiny_moe_top2", "zero=stage2"]

# (hostfile text or None for "no file", extra overrides, expected fragment of the message)
BAD: list[tuple[str | bytes | None, list[str], str]] = [
    ("a;touch /tmp/x slots=1\n", [], "expected `hostname slots=N`, got 'a;touch /tmp/x"),
    ("a;touch slots=1\n", [], "'a;touch' is not a plain host name"),
    ("$(id) slots=1\n", [], "'$(id)' is not a plain host name"),
    ("-oProxyCommand=x slots=1\n", [], "'-oProxyCommand=x' is not a plain host name"),
    ("`id` slots=1\n", [], "is not a plain host name"),
    ("host|nc slots=1\n", [], "is not a plain host name"),
    ("node1 slots=1\nnode1 slots=2\n", [], "host node1 is listed twice"),
    ("", [], "lists no hosts"),
    ("# only a comment\n\n", [], "lists no hosts"),
    ("node1 slots=0\n", [], "slots=0 must be a positive whole number"),
    ("node1 slots=-2\n", [], "slots=-2 must be a positive whole number"),
    ("node1 slots=two\n", [], "slots=two must be a positive whole number"),
    ("node1\n", [], "expected `hostname slots=N`"),
    ("node1 slots=1 extra\n", [], "expected `hostname slots=N`"),
    (None, [], "does not exist"),
    ("n1 slots=1\nn2 slots=1\nn3 slots=1\n", ["parallel=ep2"], "does not divide the world size 3"),
    ("n1 slots=3\n", ["parallel=ep2"], "does not divide the world size 3"),
    ("n1 slots=2\nn2 slots=2\n", ["parallel=ep8"], "does not divide model.moe.num_experts=4"),
    ("n1 slots=1\n", ["cluster.include=n9"], "names host 'n9', which the hostfile lacks"),
    ("n1 slots=1\n", ["cluster.exclude=n1"], "leave no host"),
    ("n1 slots=1\n", ["cluster.num_nodes=3"], "cluster.num_nodes=3 exceeds the 1 hosts"),
    ("n1 slots=1\n", ["cluster.include=n1", "cluster.exclude=n1"], "are exclusive"),
    ("n1 slots=1\n", ["cluster.master_addr='x;y'"], "cluster.master_addr='x;y' is not a plain"),
    ("n1 slots=1\n", ["cluster.socket_ifname='eth0;id'"], "is not a network interface name"),
    ("n1 slots=1\n", ["+cluster.env.BAD-KEY=1"], "cluster.env.BAD-KEY must be"),
    # counts read from the file are bounded before DeepSpeed's parser allocates by them
    ("h1 slots=99999999999\n", [], "slots=99999999999 is above the limit of 1024 ranks per host"),
    ("h1 slots=1025\n", [], "slots=1025 is above the limit of 1024 ranks per host"),
    (f"h1 slots={'9' * 5000}\n", [], "is above the limit of 1024 ranks per host"),
    ("h1 slots=\u00b2\n", [], "slots=\u00b2 must be a positive whole number"),
    ("h1 slots=00\n", [], "slots=00 must be a positive whole number"),
    (b"\xff\xfe slots=1\n", [], "is not UTF-8 text"),
    ("".join(f"h{i} slots=1\n" for i in range(10_001)), [], "lists more than 10000 hosts"),
    ("#" * (1024 * 1024 + 1), [], "is larger than 1024 KiB"),
    ("n1 slots=1\n", ["cluster.num_nodes=99999999999"], "cluster.num_nodes=99999999999 exceeds"),
    ("n1 slots=1\n", ["cluster.nproc_per_node=99999999999"], "nproc_per_node=99999999999 is"),
]


def compose(hostfile: Path, overrides: list[str]) -> list[str]:
    return [*MOE, "cluster=hostfile", f"cluster.hostfile={hostfile}", *overrides]


def write(hostfile: Path, text: str | bytes | None) -> None:
    if isinstance(text, bytes):
        hostfile.write_bytes(text)
    elif text is not None:
        hostfile.write_text(text)


IDS = [b[2][:40] for b in BAD]


@pytest.mark.parametrize(("text", "overrides", "message"), BAD, ids=IDS)
def test_bad_hostfile_or_cluster(
    text: str | bytes | None, overrides: list[str], message: str, tmp_path: Path
) -> None:
    hostfile = tmp_path / "hostfile"
    write(hostfile, text)
    cfg = to_schema(compose_config(compose(hostfile, overrides)))
    with pytest.raises(ConfigError) as err:
        resolve_hosts(cfg)
        validate(cfg)
    assert message in str(err.value)
    assert str(err.value).endswith(".") and "\n" not in str(err.value)


@pytest.mark.parametrize(("text", "overrides", "message"), BAD, ids=IDS)
def test_cli_rejects_every_row(
    text: str | bytes | None,
    overrides: list[str],
    message: str,
    tmp_path: Path,
    cli_rejects: Rejects,
) -> None:
    hostfile = tmp_path / "hostfile"
    write(hostfile, text)
    cli_rejects(compose(hostfile, overrides), message)


def test_good_hostfile_sets_world(tmp_path: Path) -> None:
    hostfile = tmp_path / "hosts"
    hostfile.write_text(
        "# head\nnode-a slots=2  # trailing comment\n10.0.0.2 slots=2\nfe80::1 slots=2\n"
    )
    assert parse_hostfile(hostfile) == {"node-a": 2, "10.0.0.2": 2, "fe80::1": 2}
    cfg = to_schema(compose_config(compose(hostfile, ["parallel=ep2", "cluster.num_nodes=2"])))
    resources = resolve_hosts(cfg)
    validate(cfg)
    assert resources is not None and list(resources.hosts) == ["node-a", "10.0.0.2"]
    assert cfg.world_size == 4 and cfg.cluster.nodes == 2
    cfg = to_schema(compose_config(compose(hostfile, ["cluster.include=node-a:1@10.0.0.2"])))
    assert resolve_hosts(cfg) is not None and cfg.world_size == 3


def test_without_a_filter_the_slots_are_deepspeeds() -> None:
    """No include/exclude: every slot of every host, in file order, as DeepSpeed's parser says
    (the launcher then does not load DeepSpeed); with one, DeepSpeed's parser decides."""
    from collections import OrderedDict

    from deepspeed.launcher.runner import parse_inclusion_exclusion

    from launcher.hostfile import filtered

    pool = OrderedDict([("b", 2), ("a", 3), ("c", 1)])
    assert filtered(pool, "", "") == parse_inclusion_exclusion(pool, "", "")
    assert list(filtered(pool, "", "").items()) == [("b", [0, 1]), ("a", [0, 1, 2]), ("c", [0])]
    assert filtered(pool, "", "a:1") == parse_inclusion_exclusion(pool, "", "a:1")
    assert filtered(pool, "", "a:1")["a"] == [0, 2]


def test_plain_host_names() -> None:
    for ok in ("node1", "gpu-node-01.cluster.local", "10.77.0.1", "::1", "a_b"):
        assert is_plain_host(ok), ok
    for bad in ("", "-x", "a b", "a;b", "$(id)", "a/b", "host:22", "a..b", "x" * 300):
        assert not is_plain_host(bad), bad


@pytest.mark.parametrize("index", [0, 2, 3, 15], ids=["semicolon", "subshell", "dash-option", "ep"])
def test_cli_rejects_before_any_process(index: int, tmp_path: Path, shared_cache: Path) -> None:
    text, overrides, message = BAD[index]
    hostfile = tmp_path / "hostfile"
    write(hostfile, text)
    proc = run_launcher(tmp_path, shared_cache, *compose(hostfile, overrides), timeout=120)
    assert proc.returncode == 2, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1 and message in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.rglob("command.sh")), "nothing rendered"
    assert not (tmp_path / "mlflow.db").exists()
    assert not Path("/tmp/x").exists()


def test_dry_run_example_2x8(tmp_path: Path, shared_cache: Path, repo: Path) -> None:
    args = ["cluster=hostfile", "model=moe_top2", "parallel.ep_size=8", "launch.dry_run=true"]
    hostfile = f"cluster.hostfile={repo / 'hostfiles/example_2x8.txt'}"
    proc = run_launcher(tmp_path, shared_cache, hostfile, *args, timeout=120)
    assert proc.returncode == 0, proc.stderr
    command = proc.stdout.strip().splitlines()[-1]
    assert command.startswith("deepspeed --hostfile=") and "--master_addr=gpu-node-01" in command
    (run_dir,) = (tmp_path / "runs" / "moelab").iterdir()
    assert (run_dir / "hostfile").read_text().count("slots=8") == 2
    env_lines = (run_dir / ".deepspeed_env").read_text().splitlines()
    assert env_lines and all("=" in ln and ln.strip() for ln in env_lines)
    assert "DS_ENV_FILE=" in (run_dir / "command.sh").read_text()
    assert '"train_batch_size": 128' in (run_dir / "ds_config.json").read_text()


def test_backends_render(tmp_path: Path) -> None:
    """no_ssh: one script per node; openmpi: the MPI runner; slurm: a job.sbatch with srun."""
    from launcher.backends import render

    hostfile = tmp_path / "hosts"
    hostfile.write_text("h1 slots=2\nh2 slots=2\n")
    runs = {}
    for backend in ("no_ssh", "openmpi", "slurm"):
        extra = [] if backend == "slurm" else [f"cluster.hostfile={hostfile}"]
        cfg = to_schema(compose_config([*MOE, f"cluster={backend}", *extra, "parallel=ep2"]))
        resources = resolve_hosts(cfg)
        validate(cfg)
        runs[backend] = render(cfg, tmp_path / backend, resources)
    no_ssh = runs["no_ssh"]
    assert [c[c.index("--no_ssh") + 1] for c in no_ssh.commands] == [
        "--node_rank=0",
        "--node_rank=1",
    ]
    assert "--master_addr=h1" in no_ssh.commands[1]
    assert (tmp_path / "no_ssh" / "node_1.sh").read_text().count("--node_rank=1") == 1
    assert runs["openmpi"].command[:2] == ["deepspeed", "--launcher=openmpi"]
    assert runs["openmpi"].command[2].startswith("--launcher_args=--bind-to none ")  # unpinned
    sbatch = (tmp_path / "slurm" / "job.sbatch").read_text()
    assert "#SBATCH --nodes=2" in sbatch and "srun --ntasks-per-node=1" in sbatch
    assert '--node_rank="$SLURM_NODEID"' in sbatch and "slots=8" in sbatch
    assert runs["slurm"].command[0] == "sbatch"
