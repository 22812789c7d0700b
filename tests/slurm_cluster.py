"""A real SLURM cluster on this machine, for tests: one slurmctld and one slurmd per emulated node,
all on loopback, from Debian's packages (`apt-get install slurmctld slurmd slurm-client`; `.ci/run`
installs them). Authentication is auth/none, so no munge daemon is needed.

Several slurmd on one machine is Debian's MULTIPLE_SLURMD build: each node gets its own port, spool
and pid file, and its name is added to /etc/hosts (removed again on stop) because jobs resolve the
first node's name as the rendezvous address. Every file lives in one temporary folder, and the
daemons are stopped by the PIDs they wrote there, never by name.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

COMMANDS = ("slurmctld", "slurmd", "sbatch", "scontrol", "srun", "scancel", "squeue", "sinfo")
HOSTS_FILE = Path("/etc/hosts")


def unavailable_reason() -> str | None:
    """Why a local cluster cannot start here, or None when it can."""
    missing = [name for name in COMMANDS if shutil.which(name) is None and not Path("/usr/sbin", name).exists()]
    if missing:
        return (f"SLURM is not installed ({', '.join(missing)} missing): "
                "apt-get install slurmctld slurmd slurm-client, as .ci/run does")
    if os.geteuid() != 0:
        return "a local SLURM cluster needs root (slurmd launches jobs and the test edits /etc/hosts)"
    if not os.access(HOSTS_FILE, os.W_OK):
        return f"{HOSTS_FILE} is not writable, so emulated node names cannot resolve"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _binary(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


@dataclass
class Job:
    job_id: str
    fields: dict[str, str] = field(default_factory=dict)

    @property
    def state(self) -> str:
        return self.fields.get("JobState", "UNKNOWN")

    @property
    def restarts(self) -> int:
        return int(self.fields.get("Restarts", "0"))

    @property
    def exit_code(self) -> str:
        return self.fields.get("ExitCode", "")


FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


class LocalSlurmCluster:
    """`nodes` emulated nodes of `cpus_per_node` CPUs each (advertised; the machine may have fewer)."""

    def __init__(self, root: Path, nodes: int = 2, cpus_per_node: int = 4):
        self.root = Path(root)
        self.prefix = f"mlite{os.getpid()}n"
        self.node_names = [f"{self.prefix}{i}" for i in range(1, nodes + 1)]
        self.cpus_per_node = cpus_per_node
        self.conf = self.root / "slurm.conf"
        self._hosts_line = f"127.0.0.1 {' '.join(self.node_names)}  # megatron-lite test cluster {os.getpid()}\n"

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout_s: float = 60.0) -> "LocalSlurmCluster":
        self.root.mkdir(parents=True, exist_ok=True)
        for sub in ("state", "spool", "logs"):
            (self.root / sub).mkdir(exist_ok=True)
        self._write_conf()
        self._add_hosts()
        try:
            self._run_daemon([_binary("slurmctld"), "-f", str(self.conf)])
            for name in self.node_names:
                self._run_daemon([_binary("slurmd"), "-f", str(self.conf), "-N", name])
            self._wait_until_idle(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        # Jobs first: their slurmstepd and ranks would outlive the daemons and keep the CPUs busy.
        if self._alive(self.root / "slurmctld.pid"):
            self.command(_binary("scancel"), "--full", "--partition=debug", check=False)
            deadline = time.monotonic() + 20
            while self.command(_binary("squeue"), "-h", check=False).strip() and time.monotonic() < deadline:
                time.sleep(0.5)
        pids = sorted(self.root.glob("*.pid"))
        for pid_file in pids:
            self._kill(pid_file, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for pid_file in pids:
            while self._alive(pid_file) and time.monotonic() < deadline:
                time.sleep(0.2)
            self._kill(pid_file, signal.SIGKILL)
        self._remove_hosts()

    def __enter__(self) -> "LocalSlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ jobs
    @property
    def env(self) -> dict[str, str]:
        return dict(os.environ, SLURM_CONF=str(self.conf))

    def command(self, *args: str, timeout: float = 60, check: bool = True) -> str:
        done = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
        return done.stdout

    def submit(self, script: str | Path, *args: str, sbatch_options: tuple[str, ...] = (), cwd: Path | None = None,
               env: dict[str, str] | None = None) -> str:
        """sbatch SCRIPT ARGS (options before the script override its #SBATCH lines); returns the job id."""
        done = subprocess.run([_binary("sbatch"), "--parsable", *sbatch_options, str(script), *args],
                              env={**self.env, **(env or {})}, cwd=cwd, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"sbatch failed ({done.returncode}): {done.stderr.strip()}")
        return done.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> Job:
        out = self.command(_binary("scontrol"), "show", "job", "-o", job_id, check=False)
        fields = dict(re.findall(r"(\w+)=(\S*)", out))
        return Job(job_id, fields)

    def wait(self, job_id: str, timeout_s: float, until=lambda job: job.state in FINISHED) -> Job:
        """Poll the job until `until(job)`; raises TimeoutError with its last state."""
        deadline = time.monotonic() + timeout_s
        while True:
            job = self.job(job_id)
            if until(job):
                return job
            if time.monotonic() > deadline:
                self.command(_binary("scancel"), job_id, check=False)  # no job left running behind a failed test
                raise TimeoutError(f"job {job_id} still {job.state} after {timeout_s:.0f} s (cancelled): {job.fields}")
            time.sleep(0.5)

    def signal(self, job_id: str, sig: str = "USR1") -> None:
        """What `--signal=USR1@lead` does at the time limit, now: the signal reaches every task."""
        self.command(_binary("scancel"), f"--signal={sig}", job_id)

    def daemon_logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted((self.root / "logs").glob("*.log")))

    # ------------------------------------------------------------------ internals
    def _write_conf(self) -> None:
        host = socket.gethostname().split(".")[0]
        node_lines = [
            f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={_free_port()} "
            f"CPUs={self.cpus_per_node} State=UNKNOWN"
            for name in self.node_names
        ]
        root = self.root
        self.conf.write_text("\n".join([
            f"ClusterName=mlite{os.getpid()}",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/none",
            "CredType=cred/none",
            "AuthInfo=cred_expire=10",  # a requeued job waits cred_expire + 1 s (default 121 s) before it starts
            "CommunicationParameters=NoInAddrAny,NoCtldInAddrAny",
            "SlurmdParameters=config_overrides",
            f"StateSaveLocation={root / 'state'}",
            f"SlurmdSpoolDir={root / 'spool'}/%n",
            f"SlurmctldPidFile={root / 'slurmctld.pid'}",
            f"SlurmdPidFile={root / 'slurmd.%n.pid'}",
            f"SlurmctldLogFile={root / 'logs' / 'slurmctld.log'}",
            f"SlurmdLogFile={root / 'logs' / 'slurmd.%n.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "MpiDefault=none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MailProg=/bin/true",
            "ReturnToService=2",
            "SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=5",
            "MinJobAge=600",
            "KillWait=5",
            "InactiveLimit=0",
            *node_lines,
            f"PartitionName=debug Nodes={','.join(self.node_names)} Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))

    def _run_daemon(self, argv: list[str]) -> None:
        done = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr.strip()}\n{self.daemon_logs()}")

    def _wait_until_idle(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        states = ""
        while time.monotonic() < deadline:
            states = self.command(_binary("sinfo"), "-h", "-N", "-o", "%N %t", check=False)
            idle = [line for line in states.splitlines() if line.split()[-1:] == ["idle"]]
            if len(idle) == len(self.node_names):
                return
            time.sleep(0.3)
        raise RuntimeError(f"SLURM nodes not idle after {timeout_s:.0f} s: {states!r}\n{self.daemon_logs()}")

    def _pid(self, pid_file: Path) -> int | None:
        try:
            pid = int(pid_file.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return None
        return pid if b"slurm" in cmdline and str(self.conf).encode() in cmdline else None

    def _alive(self, pid_file: Path) -> bool:
        return self._pid(pid_file) is not None

    def _kill(self, pid_file: Path, sig: int) -> None:
        pid = self._pid(pid_file)
        if pid is not None:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def _add_hosts(self) -> None:
        self._rewrite_hosts(lambda line: not self._stale_hosts_line(line))
        with HOSTS_FILE.open("r+") as hosts:
            text = hosts.read()
            hosts.write(("" if not text or text.endswith("\n") else "\n") + self._hosts_line)

    def _remove_hosts(self) -> None:
        self._rewrite_hosts(lambda line: line != self._hosts_line)

    @staticmethod
    def _stale_hosts_line(line: str) -> bool:
        """A line an earlier, killed test run left behind (its process is gone)."""
        match = re.search(r"# megatron-lite test cluster (\d+)$", line.strip())
        return bool(match) and not Path(f"/proc/{match.group(1)}").exists()

    @staticmethod
    def _rewrite_hosts(keep) -> None:
        # In place (not rename): /etc/hosts is often a bind mount.
        with HOSTS_FILE.open("r+") as hosts:
            lines = hosts.readlines()
            kept = [line for line in lines if keep(line)]
            if len(kept) != len(lines):
                hosts.seek(0)
                hosts.writelines(kept)
                hosts.truncate()
