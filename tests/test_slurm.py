"""cluster=slurm and hydra/launcher=submitit_slurm on a throwaway two-node Slurm cluster.

The nodes are two network hosts (slurm_cluster.py). (a) a 2-node x 1-rank MoE run completes,
its all-to-all bytes counted on the link between the nodes; (b) a job that fails on its ranks
ends FAILED in Slurm and MLflow with the rank's error printed; (c) SIGINT to moelab-launch
cancels the running job; (d) a two-job sweep through submitit keeps MLflow's parent/child runs."""

from __future__ import annotations

import os
import pty
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from helpers import launcher_env, unavailable
from launcher.backends.sbatch import minutes
from launcher.compose import compose_config, to_schema
from launcher.errors import ConfigError
from launcher.validate import validate
from slurm_cluster import IFNAME, NODES, PARTITION, SlurmCluster, missing_prerequisite

FAST = [
    *("train=smoke", "train.steps=2", "train.eval_every=2", "train.eval_batches=1"),
    "train.threads_per_rank=1",
    *("telemetry.system_metrics=false", "telemetry.peak_tflops=1", "telemetry.heatmap_every=0"),
]
MOE = ["model=tiny_moe_top2", "zero=stage2", "parallel=ep2", *FAST]
LONG = ["train.steps=24", "train.log_every=1", "train.eval_every=12"]  # stopped mid-way below
SLURM = [
    *("cluster=slurm", "cluster.nodes=2", "cluster.nproc_per_node=1", "cluster.slurm_time=10"),
    f"cluster.socket_ifname={IFNAME}",  # gloo between the nodes: over their link
]


@pytest.fixture(scope="module")
def slurm() -> Iterator[SlurmCluster]:
    """One cluster for the module; stopped and removed afterwards, also on failure."""
    reason = missing_prerequisite()
    if reason is not None:
        unavailable(f"Slurm test cluster unavailable: {reason}")
    cluster = SlurmCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def cache(shared_cache: Path) -> Path:
    """The corpus tokenized once, before any job (both "nodes" share this disk)."""
    from moelab.data import prepare_data

    prepare_data(to_schema(compose_config([*MOE, f"data.cache_dir={shared_cache}"])).data)
    return shared_cache


def launch(
    cluster: SlurmCluster, workdir: Path, cache: Path, *args: str, **popen: Any
) -> subprocess.Popen[str]:
    env = {**launcher_env(workdir, cache), "SLURM_CONF": str(cluster.conf)}
    popen.setdefault("stdin", subprocess.DEVNULL)  # not a terminal: Ctrl-C cancels at once
    proc = subprocess.Popen(
        [sys.executable, "-m", "launcher", *args],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )
    return cluster.follow(proc)


def finish(
    cluster: SlurmCluster, proc: subprocess.Popen[str], timeout: float = 400
) -> tuple[int, str]:
    """The launcher's exit code and output; fails at once, naming it, if a daemon died."""
    out, _ = proc.communicate(timeout=timeout)
    cluster.check()
    return proc.returncode, out


def runs(workdir: Path) -> list[Any]:
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    return list(client.search_runs([client.get_experiment_by_name("moelab").experiment_id]))


BAD_DATA = ["data.source=hub", "data.path=/nonexistent/moelab-data"]  # only the ranks look
SWEEP = [
    *("-m", "hydra/launcher=submitit_slurm", "hydra.launcher.timeout_min=10"),
    *("model=tiny_dense", *FAST, "cluster.nproc_per_node=1", "train.seed=1,2"),
]


STARTED = r"^moelab-launch: job \d+ (RUNNING on |FAILED|COMPLETED)"  # ran, however briefly


@dataclass
class Job:
    """A launch of `started`, its output read so far, and the (received, sent) bytes of node
    n2's link before it."""

    proc: subprocess.Popen[str]
    workdir: Path
    link_before: tuple[int, int]
    seen: str = ""

    def finish(self, cluster: SlurmCluster) -> tuple[int, str]:
        code, rest = finish(cluster, self.proc)
        return code, self.seen + rest


@pytest.fixture(scope="module")
def started(
    slurm: SlurmCluster, cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Job]]:
    """(a), (b) and (d), each submitted once the one before runs: they overlap on the cores,
    and their step launches do not reach slurmd at the same instant (see slurm_cluster.py)."""
    specs = {"complete": [*SLURM, *MOE, *LONG], "fail": [*SLURM, *MOE, *BAD_DATA], "sweep": SWEEP}
    jobs: dict[str, Job] = {}
    try:
        for name, args in specs.items():
            workdir, before = tmp_path_factory.mktemp(name), slurm.net.link_bytes(NODES[1])
            jobs[name] = job = Job(launch(slurm, workdir, cache, *args), workdir, before)
            if name != "sweep":
                job.seen, _ = follow_until(slurm, job.proc, STARTED)
        yield jobs
    finally:
        for job in jobs.values():
            if job.proc.poll() is None:
                job.proc.kill()
            job.proc.communicate()


@pytest.mark.slow
def test_two_nodes_moe_run_completes(slurm: SlurmCluster, started: dict[str, Job]) -> None:
    job = started["complete"]
    code, out = job.finish(slurm)
    after = slurm.net.link_bytes(NODES[1])
    received, sent = (a - b for a, b in zip(after, job.link_before, strict=True))
    assert code == 0, out[-6000:]
    (run,) = runs(job.workdir)
    tags = run.data.tags
    assert run.info.status == "FINISHED"
    assert (tags["world_size"], tags["nodes"]) == ("2", "2")
    assert tags["hostnames"] == "n1,n2", "each rank ran on its own host"
    assert slurm.job_state(tags["slurm_job_id"])["JobState"] == "COMPLETED"
    assert run.data.metrics["moe/a2a_ms"] > 0, "the all-to-all ran between the two nodes"
    assert "moe/layer_0/a2a_ms" in run.data.metrics
    # rank 1 (node n2) sent its share of every all-to-all through n2's link, and got rank 0's
    a2a = run.data.metrics["moe/a2a_bytes_total"]
    assert a2a > 0 and min(sent, received) >= a2a, (
        f"node n2's link sent {sent} and received {received} bytes during the run; its rank's "
        f"all-to-alls alone sent {a2a:.0f}"
    )
    # the terminal got node 0's log (rank 0), not node 1's; the master is node n1's NodeAddr
    assert "--node_rank=0" in out and "--node_rank=1" not in out
    assert f"--master_addr={slurm.net.address(NODES[0])}" in out
    run_dir = Path(tags["run_dir"])
    assert "--node_rank=1" in (run_dir / "train-node1.log").read_text()
    assert (run_dir / "hostfile.slurm").read_text() == "n1 slots=1\nn2 slots=1\n"


@pytest.mark.slow
def test_failing_job_ends_failed(slurm: SlurmCluster, started: dict[str, Job]) -> None:
    code, out = started["fail"].finish(slurm)
    assert code != 0, out[-3000:]
    assert "Couldn't find any data file at /nonexistent/moelab-data" in out
    (run,) = runs(started["fail"].workdir)
    assert run.info.status == "FAILED"
    state = slurm.job_state(run.data.tags["slurm_job_id"])
    assert (state["JobState"], state["Requeue"], state["Restarts"]) == ("FAILED", "1", "0"), (
        "a requeueable job that failed on its own is not requeued"
    )


def losses(workdir: Path) -> dict[int, float]:
    """train/loss of the one run in `workdir`, by step (every step is logged: LONG)."""
    (run,) = runs(workdir)
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    history = client.get_metric_history(run.info.run_id, "train/loss")
    steps = [m.step for m in history]
    assert len(steps) == len(set(steps)), f"steps logged twice: {sorted(steps)}"
    return {m.step: m.value for m in history}


def follow_until(
    cluster: SlurmCluster, proc: subprocess.Popen[str], pattern: str
) -> tuple[str, str]:
    """Read the launcher's output up to the line matching `pattern`: (that output, the Slurm
    job id)."""
    assert proc.stdout is not None
    seen, job_id, found = [], "", False
    for line in proc.stdout:
        seen.append(line)
        job_id = m[1] if (m := re.search(r"Slurm job (\d+)", line)) else job_id
        if found := re.search(pattern, line) is not None:
            break
    cluster.check()
    assert found, "".join(seen)[-4000:]
    return "".join(seen), job_id


@pytest.mark.slow
def test_signalled_job_checkpoints_requeues_and_resumes_exactly(
    slurm: SlurmCluster, started: dict[str, Job], cache: Path, tmp_path: Path
) -> None:
    """Stopped by train.stop_after, the run is resumed by `moelab-launch resume <run dir>` (a
    new job from the same job.sbatch). That job gets USR1 as Slurm sends it before the time
    limit (`--signal=B:USR1@...`: the batch shell only): the ranks checkpoint, the job requeues
    itself, starts again and finishes; one MLflow run, the uninterrupted run's losses."""
    first_launch = launch(slurm, tmp_path, cache, *SLURM, *MOE, *LONG, "train.stop_after=4")
    code, out = finish(slurm, first_launch)
    assert code == 0, out[-4000:]
    (first,) = runs(tmp_path)
    run_dir = Path(first.data.tags["run_dir"])
    assert first.info.status == "KILLED" and f"moelab-launch resume {run_dir}" in out
    proc = launch(slurm, tmp_path, cache, "resume", str(run_dir))
    seen, job_id = follow_until(slurm, proc, "step 5 is the first this attempt computed")
    signal_job = ["scancel", "--batch", "--signal=USR1", job_id]
    assert subprocess.run(signal_job, env=slurm.env, timeout=60).returncode == 0
    code, rest = finish(slurm, proc)
    out = seen + rest
    assert code == 0, out[-6000:]
    (run,) = runs(tmp_path)
    assert (run.info.run_id, run.info.status) == (first.info.run_id, "FINISHED")
    assert run.data.tags["slurm_job_id"] == job_id and run.data.tags["moelab.requeues"] == "1"
    state = slurm.job_state(job_id)
    assert (state["JobState"], state["Restarts"]) == ("COMPLETED", "1")
    followed = [ln for ln in out.splitlines() if ln.startswith(f"moelab-launch: job {job_id} ")]
    states = [ln.split()[3] for ln in followed]
    assert "PENDING" in states[states.index("RUNNING") :], f"not followed across: {followed}"
    assert states[-1] == "COMPLETED"
    err = (run_dir / f"slurm-{job_id}.err").read_text()
    assert f"job {job_id} got USR1" in err and f"requeueing job {job_id}" in err
    node0 = (run_dir / "train-node0.log").read_text()  # three attempts, one log
    assert node0.count("is the first this attempt computed") == 3, node0[-3000:]
    if started["complete"].proc.returncode is None:
        started["complete"].finish(slurm)
    reference, resumed = losses(started["complete"].workdir), losses(tmp_path)
    assert sorted(resumed) == list(range(1, 25)), "every step logged once, none lost"
    worst = max(abs(resumed[s] - reference[s]) for s in reference)
    assert worst <= 1e-6, f"losses differ from the uninterrupted run's by up to {worst:.2e}"


@pytest.mark.slow
def test_sigint_cancels_the_job(slurm: SlurmCluster, tmp_path: Path, cache: Path) -> None:
    """On a terminal the launcher asks before cancelling; the answer comes from the pty."""
    tty, pty_slave = pty.openpty()
    args = [*SLURM, *MOE, "train.steps=500"]  # cancelled long before the end
    proc = launch(slurm, tmp_path, cache, *args, stdin=pty_slave)
    os.close(pty_slave)
    assert proc.stdout is not None
    seen, _ = follow_until(slurm, proc, " RUNNING on ")
    proc.send_signal(signal.SIGINT)
    os.write(tty, b"y\n")
    code, out = finish(slurm, proc, timeout=120)
    os.close(tty)
    assert code == 128 + signal.SIGINT, seen + out
    (run,) = runs(tmp_path)
    job_id = run.data.tags["slurm_job_id"]
    assert f"cancel job {job_id}? [y/N]" in out
    assert slurm.squeue() == []
    assert run.info.status == "KILLED"
    assert slurm.job_state(job_id)["JobState"] == "CANCELLED"


@pytest.mark.slow
def test_submitit_sweep_parent_and_children(slurm: SlurmCluster, started: dict[str, Job]) -> None:
    code, out = started["sweep"].finish(slurm)
    tmp_path = started["sweep"].workdir
    assert code == 0, out[-6000:]
    (parent,) = [r for r in runs(tmp_path) if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs(tmp_path) if "mlflow.parentRunId" in r.data.tags]
    assert parent.info.status == "FINISHED"
    assert len(children) == 2
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert {c.info.status for c in children} == {"FINISHED"}
    assert {c.data.tags["override.train.seed"] for c in children} == {"1", "2"}
    job_ids = {c.data.tags["slurm_job_id"] for c in children}
    assert len(job_ids) == 2, "each job of the sweep ran as its own Slurm job"


# --- in-process: rendering, validation, checks against the cluster -----------------------


def test_slurm_options_compose() -> None:
    from hydra import compose, initialize_config_dir

    from launcher.compose import CONFIG_DIR, register_schema

    extra = "cluster.slurm_extra=['--qos=high','--constraint=a100']"
    more = [extra, "cluster.slurm_account=proj", "cluster.wait=false"]
    cfg = to_schema(compose_config([*SLURM, *more]))
    assert cfg.cluster.slurm_extra == ["--qos=high", "--constraint=a100"]
    assert (cfg.cluster.slurm_account, cfg.cluster.wait) == ("proj", False)
    register_schema()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        hc = compose("config", ["hydra/launcher=submitit_slurm"], return_hydra_config=True)
    assert hc.hydra.launcher._target_.endswith("submitit_launcher.SlurmLauncher")


def test_job_sbatch_rendered(tmp_path: Path) -> None:
    from launcher.backends import render

    opts = ["cluster.gpus_per_node=4", "cluster.slurm_partition=gpu", "cluster.slurm_account=proj"]
    extra = "cluster.slurm_extra=['--qos=high']"
    cfg = to_schema(compose_config([*SLURM, *MOE, *opts, extra, "parallel.ep_size=4"]))
    validate(cfg)
    files = render(cfg, tmp_path)
    text = (tmp_path / "job.sbatch").read_text()
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj",
        "#SBATCH --time=10",
        "#SBATCH --qos=high",
        f"#SBATCH --output={tmp_path}/slurm-%j.out",
        f"#SBATCH --error={tmp_path}/slurm-%j.err",
        "#SBATCH --open-mode=append",
        "#SBATCH --requeue",
        "#SBATCH --signal=B:USR1@120",
        "trap on_stop USR1",
        f"  python -m launcher.slurm_job requeue {tmp_path} && exit 0",
    ):
        assert line in text.splitlines(), line
    assert "2 nodes x 4 ranks per node = world size 8" in text
    assert '--node_rank="$SLURM_NODEID" --master_addr="$MASTER_ADDR"' in text
    assert files.command == ["sbatch", "--parsable", str(tmp_path / "job.sbatch")]
    assert "launcher.slurm_job end-run" not in text  # followed: the launcher ends the run
    cfg.cluster.wait = False
    render(cfg, tmp_path)
    epilogue = f"python -m launcher.slurm_job end-run {tmp_path} $code"
    assert epilogue in (tmp_path / "job.sbatch").read_text()
    cfg.cluster.slurm_requeue = False
    render(cfg, tmp_path)
    text = (tmp_path / "job.sbatch").read_text()
    assert "#SBATCH --no-requeue" in text and "--signal" not in text and "trap" not in text


BAD = [
    (["cluster.slurm_time=1:2:3:4"], "cluster.slurm_time='1:2:3:4' is not a Slurm time"),
    (["cluster.world_size=4"], "cluster.world_size=4 is not cluster.nodes x ranks per node"),
    (["cluster.slurm_extra=['--nodes=4']"], "entry '--nodes=4' sets what moelab renders"),
    (["cluster.slurm_extra=['qos=high']"], "entry 'qos=high' is not an sbatch option"),
    (["cluster.slurm_extra=['--signal=B:USR2@60']"], "sets what moelab renders itself"),
    (["cluster.slurm_signal_seconds=600"], "slurm_signal_seconds=600 must be at least 1 and below"),
    (["cluster.slurm_signal_seconds=0"], "slurm_signal_seconds=0 must be at least 1"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD, ids=[o[0] for o, _ in BAD])
def test_slurm_config_rejected(overrides: list[str], message: str) -> None:
    cfg = to_schema(compose_config([*SLURM, *MOE, *overrides]))
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert message in str(err.value) and str(err.value).count(". ") == 0


def test_time_limits() -> None:
    assert [minutes(t) for t in ("90", "90:30", "1:30:00", "2-3", "2-03:10", "1-0:0:1")] == [
        *(90, 91, 90, 2 * 1440 + 180, 2 * 1440 + 190, 1441),
    ]
    assert minutes("soon") is None and minutes("1:2:3:4") is None


@pytest.mark.slow
def test_checked_against_the_cluster(slurm: SlurmCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    from launcher.backends.slurm import check_cluster

    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))

    def error(*overrides: str) -> str:
        with pytest.raises(ConfigError) as err:
            check_cluster(to_schema(compose_config([*SLURM, *MOE, *overrides])))
        return str(err.value)

    check_cluster(to_schema(compose_config([*SLURM, *MOE, f"cluster.slurm_partition={PARTITION}"])))
    assert "cluster.slurm_partition='gpu' is not a partition" in error(
        "cluster.slurm_partition=gpu"
    )
    assert "(sinfo lists: debug)" in error("cluster.slurm_partition=gpu")
    assert "cluster.nodes=3 exceeds the 2 nodes of partition debug" in error("cluster.nodes=3")
    monkeypatch.setenv("PATH", "/nonexistent")
    assert "needs Slurm's sbatch on the PATH" in error()


# --- each node prepares its data, and its ranks get the GPUs Slurm gave the node -----------


def test_node_step_prepares_then_keeps_slurms_gpus(tmp_path: Path) -> None:
    """job.sbatch prepares the data on every node before deepspeed; a node whose Slurm
    CUDA_VISIBLE_DEVICES is 2,3 hands its ranks devices 2 and 3 (DeepSpeed's own hostfile and
    --include parsing reads the arguments), the other node keeps its count."""
    from deepspeed.launcher.runner import fetch_hostfile, parse_inclusion_exclusion

    from launcher.backends import render
    from launcher.slurm_job import node_args

    cfg = to_schema(compose_config([*SLURM, *MOE, "cluster.gpus_per_node=2"]))
    validate(cfg)
    render(cfg, tmp_path)
    step = next(ln for ln in (tmp_path / "job.sbatch").read_text().splitlines() if "srun " in ln)
    assert (
        f"python -m moelab.datacache --config {tmp_path}/config.yaml && exec "
        f"python -m launcher.slurm_job node {tmp_path}/hostfile.slurm deepspeed --no_ssh "
    ) in step
    hostfile = tmp_path / "hostfile.slurm"  # what the job writes from its node list
    hostfile.write_text("n1 slots=2\nn2 slots=2\n")
    assert node_args(hostfile, 1, None) == [f"--hostfile={hostfile}"]  # no GPUs: as before
    args = dict(a.removeprefix("--").split("=", 1) for a in node_args(hostfile, 1, "2,3"))
    pool = fetch_hostfile(args["hostfile"])
    assert parse_inclusion_exclusion(pool, args["include"], "") == {"n1": [0, 1], "n2": [2, 3]}
    with pytest.raises(ConfigError, match="node n2 has CUDA_VISIBLE_DEVICES=5, not 2 GPU"):
        node_args(hostfile, 1, "5")


SHOW_RANK = """
import os
print(f"rank {os.environ['RANK']} local {os.environ['LOCAL_RANK']} "
      f"devices {os.environ['CUDA_VISIBLE_DEVICES']}", flush=True)
"""


@pytest.mark.slow
def test_node_ranks_get_the_nodes_gpus(tmp_path: Path) -> None:
    """The real per-node chain on node 1 of two (no Slurm needed): `launcher.slurm_job
    node` then DeepSpeed's runner and per-node launcher start 2 ranks that see
    CUDA_VISIBLE_DEVICES=2,3, what Slurm set for the node, where DeepSpeed alone would set 0,1.
    PYTHONPATH as job.sbatch exports it: moelab's start-up folder first."""
    from helpers import REPO, free_port
    from moelab import startup

    (tmp_path / "hostfile.slurm").write_text("n1 slots=2\nn2 slots=2\n")
    (tmp_path / "show.py").write_text(SHOW_RANK)
    env = launcher_env(tmp_path, tmp_path / "cache") | {
        "SLURM_NODEID": "1", "CUDA_VISIBLE_DEVICES": "2,3",
        "PYTHONPATH": f"{startup.FOLDER}:{REPO / 'src'}:{REPO}",
    }  # fmt: skip
    node = [
        sys.executable,
        "-m",
        "launcher.slurm_job",
        "node",
        str(tmp_path / "hostfile.slurm"),
    ]
    deepspeed = ["deepspeed", "--no_ssh", f"--master_port={free_port()}", "--node_rank=1"]
    rest = ["--master_addr=127.0.0.1", "--no_local_rank", str(tmp_path / "show.py")]
    proc = subprocess.run(
        [*node, *deepspeed, *rest], env=env, capture_output=True, text=True, timeout=300
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "rank 2 local 0 devices 2,3" in out and "rank 3 local 1 devices 2,3" in out, out
