"""A real, private, single-node SLURM for the tests: munged + slurmctld + slurmd on localhost, CPU only.

Everything (munge key and socket, slurm.conf, spool, state, logs, pid files) lives in a pytest temporary folder and
the ports are picked free, so it neither needs nor touches a system SLURM and two test runs do not collide.
The daemons are installed by the CI entry point (.ci/run, as root), never from inside a test. Without root, or without
the daemons, the test is skipped with the reason; once they are there, a cluster that cannot start fails the test
with the daemon logs. `SKIP_SLURM=1` is the explicit opt-out.
"""
from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGES = ("slurm-wlm", "munge")
DAEMONS = ("munged", "slurmctld", "slurmd")
START_TIMEOUT_S = 60


@dataclass(frozen=True)
class SlurmCluster:
    """Where the cluster lives; `env` is what a client (sbatch, squeue) needs to talk to it."""

    home: Path
    conf: Path
    env: dict[str, str]

    def logs(self) -> str:
        """The tail of every daemon log, for failure messages."""
        parts = []
        for name in DAEMONS:
            log = self.home / f"{name}.log"
            text = log.read_text(errors="replace")[-3000:] if log.exists() else "(no log written)"
            parts.append(f"----- {log} -----\n{text}")
        return "\n".join(parts)


def _which(name: str) -> str | None:
    """Daemons live in /usr/sbin, which a non-root PATH may lack."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _skip_unless_runnable() -> None:
    """slurmd launches jobs with root's powers, and the packages come from .ci/run: skip, saying which is missing."""
    if os.geteuid() != 0:
        pytest.skip("needs root: a private slurmd must run as root (CI runs the tests as root via .ci/run)")
    missing = [d for d in DAEMONS if not _which(d)]
    if missing:
        pytest.skip(f"needs the SLURM daemons ({', '.join(missing)} missing): install {' '.join(PACKAGES)} as root, "
                    "as .ci/run does")


def slurm_conf(home: Path, user: str, cpus: int) -> str:
    """The smallest slurm.conf for one CPU node on localhost: no cgroups, no accounting, no GPUs."""
    host = socket.gethostname().split(".")[0]
    return f"""\
ClusterName=fcachetest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
AuthInfo=socket={home}/munge.socket
CredType=cred/munge
StateSaveLocation={home}/state
SlurmdSpoolDir={home}/spool
SlurmctldPidFile={home}/slurmctld.pid
SlurmdPidFile={home}/slurmd.pid
SlurmctldLogFile={home}/slurmctld.log
SlurmdLogFile={home}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
MinJobAge=600
SlurmdTimeout=60
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def _start(home: Path) -> SlurmCluster:
    for sub in ("state", "spool"):
        (home / sub).mkdir(mode=0o700, exist_ok=True)
    key = home / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    conf = home / "slurm.conf"
    conf.write_text(slurm_conf(home, pwd.getpwuid(os.geteuid()).pw_name, os.cpu_count() or 1))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    cluster = SlurmCluster(home, conf, env)
    commands = [
        [_which("munged"), f"--socket={home}/munge.socket", f"--key-file={key}", f"--pid-file={home}/munged.pid",
         f"--log-file={home}/munged.log", f"--seed-file={home}/munged.seed", "--force"],
        [_which("slurmctld"), "-f", str(conf), "-c"],  # -c: no state from an earlier run
        [_which("slurmd"), "-f", str(conf)],
    ]
    for cmd in commands:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode:
            _stop(cluster)
            pytest.fail(f"'{' '.join(cmd)}' exited {done.returncode}: {done.stderr.strip()}\n{cluster.logs()}")
    _wait_for_idle_node(cluster)
    return cluster


def _wait_for_idle_node(cluster: SlurmCluster) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    state = ""
    while time.monotonic() < deadline:
        done = subprocess.run(["sinfo", "-h", "-o", "%t"], env=cluster.env, capture_output=True, text=True)
        state = (done.stdout + done.stderr).strip()
        if done.returncode == 0 and state.startswith(("idle", "mix", "alloc")):
            return
        time.sleep(0.5)
    _stop(cluster)
    pytest.fail(f"SLURM did not bring its node up within {START_TIMEOUT_S} s (sinfo: {state!r}).\n{cluster.logs()}")


def _stop(cluster: SlurmCluster) -> None:
    """SIGTERM each daemon by its pid file (never by name), newest first; SIGKILL what does not exit in 10 s."""
    for name in reversed(DAEMONS):
        pid_file = cluster.home / f"{name}.pid"
        try:
            pid = int(pid_file.read_text().split()[0])
            os.kill(pid, signal.SIGTERM)
        except (OSError, ValueError, IndexError):
            continue
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.1)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """Start the cluster once per session, hand it to the tests, and bring every daemon down afterwards."""
    if os.environ.get("SKIP_SLURM"):
        pytest.skip("SKIP_SLURM is set: the real-SLURM test is opted out on this machine")
    _skip_unless_runnable()
    home = tmp_path_factory.mktemp("slurm")  # a short path: munged's socket path must fit in 108 bytes
    cluster = _start(home)
    try:
        yield cluster
    finally:
        _stop(cluster)
