"""A real single-node Slurm cluster for the tests: munge, MariaDB + slurmdbd (real accounting, so
`sacct` and submitit report true job states), slurmctld and slurmd, all under one scratch folder.

The Debian packages (slurm-wlm, slurmdbd, munge, mariadb-server) are installed by `./test.sh` when missing.
`python tests/local_slurm.py DIR` starts one by hand and prints the SLURM_CONF to export.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

DAEMONS = ("munged", "mariadbd", "mariadb-install-db", "slurmdbd", "slurmctld", "slurmd", "sacctmgr")
CLUSTER = "mipha"


class SlurmUnavailable(RuntimeError):
    """Why the local cluster could not be started (a missing package, a daemon that did not come up)."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(check, what: str, log: Path, seconds: float = 30.0) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if check():
            return
        time.sleep(0.2)
    tail = log.read_text()[-2000:] if log.is_file() else "(no log)"
    raise SlurmUnavailable(f"{what} did not come up within {seconds:.0f} s; the end of {log}:\n{tail}")


class LocalSlurm:
    """Start with `start()`, stop with `stop()`; clients find it through `env` (SLURM_CONF)."""

    def __init__(self, root: Path, cpus: int | None = None) -> None:
        self.root = Path(root)
        self.cpus = cpus or os.cpu_count() or 2
        self.conf = self.root / "slurm.conf"
        self.daemons: list[subprocess.Popen] = []  # all in the foreground, so stopping them is direct

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(command, env=self.env, capture_output=True, text=True, check=check, timeout=60)

    def start(self) -> LocalSlurm:
        missing = [d for d in DAEMONS if shutil.which(d) is None and not Path("/usr/sbin", d).exists()]
        if missing:
            raise SlurmUnavailable(
                f"not installed: {', '.join(missing)} (Debian packages slurm-wlm slurmdbd munge "
                "mariadb-server; `.ci/run` installs them)"
            )
        if os.geteuid() != 0:
            raise SlurmUnavailable("the local Slurm cluster runs its daemons as root; these tests need root")
        self.root.mkdir(parents=True, exist_ok=True)
        for sub in ("state", "spool", "db", "log"):
            (self.root / sub).mkdir(exist_ok=True)
        try:
            self._munge()
            self._mariadb()
            self._slurmdbd()
            self._slurm()
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, name: str, *command: str) -> None:
        log = self.root / "log" / f"{name}.out"
        with log.open("a") as out:
            self.daemons.append(
                subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
            )

    def _munge(self) -> None:
        # the default socket: slurmctld's connection to slurmdbd ignores AuthInfo and looks there
        self.munge_socket = Path("/run/munge/munge.socket.2")
        self.munge_socket.parent.mkdir(parents=True, exist_ok=True)
        self.munge_socket.unlink(missing_ok=True)  # a stale socket would look like a running munged
        self._spawn(
            "munged",
            "munged",
            "--foreground",
            "--force",
            f"--socket={self.munge_socket}",
            f"--pid-file={self.root / 'munged.pid'}",
            "--key-file=/etc/munge/munge.key",
            f"--log-file={self.root / 'log' / 'munged.log'}",
            f"--seed-file={self.root / 'munged.seed'}",
        )
        _wait(self.munge_socket.exists, "munged", self.root / "log" / "munged.log")

    def _mariadb(self) -> None:
        self.db_port = _free_port()
        db = self.root / "db"
        if not (db / "mysql").is_dir():
            subprocess.run(
                ["mariadb-install-db", "--user=root", f"--datadir={db}", "--auth-root-authentication-method=normal"],
                check=True,
                capture_output=True,
                timeout=120,
            )
        self._spawn(
            "mariadb",
            "mariadbd",
            "--user=root",
            f"--datadir={db}",
            f"--socket={self.root / 'mysql.sock'}",
            f"--port={self.db_port}",
            "--bind-address=127.0.0.1",
            f"--pid-file={self.root / 'mariadb.pid'}",
            f"--log-error={self.root / 'log' / 'mariadb.err'}",
            "--innodb-buffer-pool-size=32M",
        )

        def ready() -> bool:
            probe = subprocess.run(
                ["mariadb", f"--socket={self.root / 'mysql.sock'}", "-uroot", "-e", "select 1"], capture_output=True
            )
            return probe.returncode == 0

        _wait(ready, "MariaDB", self.root / "log" / "mariadb.err", 60)

    def _slurmdbd(self) -> None:
        self.dbd_port = _free_port()
        conf = self.root / "slurmdbd.conf"
        conf.write_text(
            "\n".join(
                [
                    "AuthType=auth/munge",
                    f"AuthInfo=socket={self.munge_socket}",
                    "DbdHost=localhost",
                    "DbdAddr=127.0.0.1",
                    f"DbdPort={self.dbd_port}",
                    "SlurmUser=root",
                    f"LogFile={self.root / 'log' / 'slurmdbd.log'}",
                    f"PidFile={self.root / 'slurmdbd.pid'}",
                    "StorageType=accounting_storage/mysql",
                    "StorageHost=127.0.0.1",
                    f"StoragePort={self.db_port}",
                    "StorageUser=root",
                    "StorageLoc=slurm_acct_db",
                    "",
                ]
            )
        )
        conf.chmod(0o600)
        self._spawn("slurmdbd", "slurmdbd", "-D")  # reads slurmdbd.conf beside SLURM_CONF
        _wait(lambda: self._port_open(self.dbd_port), "slurmdbd", self.root / "log" / "slurmdbd.log")

    @staticmethod
    def _port_open(port: int) -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0

    def _slurm(self) -> None:
        memory = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.8)
        self.ctl_port, self.slurmd_port = _free_port(), _free_port()
        log = self.root / "log"
        self.conf.write_text(
            "\n".join(
                [
                    f"ClusterName={CLUSTER}",
                    "SlurmctldHost=localhost",
                    f"SlurmctldPort={self.ctl_port}",
                    f"SlurmdPort={self.slurmd_port}",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    "AuthType=auth/munge",
                    # cred_expire: a requeued job may start again after 10 s (default 120)
                    "CredType=cred/munge",
                    f"AuthInfo=socket={self.munge_socket},cred_expire=10",
                    f"StateSaveLocation={self.root / 'state'}",
                    f"SlurmdSpoolDir={self.root / 'spool'}",
                    f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
                    f"SlurmdPidFile={self.root / 'slurmd.pid'}",
                    f"SlurmctldLogFile={log / 'slurmctld.log'}",
                    f"SlurmdLogFile={log / 'slurmd.log'}",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_Core_Memory",
                    "DefMemPerCPU=2000",
                    "JobAcctGatherType=jobacct_gather/none",
                    "AccountingStorageType=accounting_storage/slurmdbd",
                    "AccountingStorageHost=localhost",
                    f"AccountingStoragePort={self.dbd_port}",
                    "JobRequeue=1",
                    "MinJobAge=600",
                    "KillWait=5",
                    "ReturnToService=2",
                    "MpiDefault=none",
                    "MailProg=/bin/true",
                    "SchedulerParameters=sched_interval=1",
                    "MessageTimeout=30",
                    f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={memory} State=UNKNOWN",
                    "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
                    "",
                ]
            )
        )
        self.run("sacctmgr", "-i", "add", "cluster", CLUSTER, check=False)
        self._spawn("slurmctld", "slurmctld", "-D", "-f", str(self.conf), "-i")
        self._spawn("slurmd", "slurmd", "-D", "-f", str(self.conf), "-N", "localhost")

        def idle() -> bool:
            out = self.run("sinfo", "-h", "-o", "%T", check=False)
            return out.returncode == 0 and out.stdout.strip() in ("idle", "mixed")

        _wait(idle, "slurmctld + slurmd (node idle)", log / "slurmctld.log", 60)

    def stop(self) -> None:
        """Cancel what is still queued or running (a failed test may leave jobs), then stop the daemons."""
        if self.daemons:
            self.run("scancel", f"--user={os.getuid()}", check=False)
            time.sleep(2)
        for daemon in reversed(self.daemons):
            daemon.terminate()
            try:
                daemon.wait(timeout=15)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        self.daemons.clear()


if __name__ == "__main__":
    cluster = LocalSlurm(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/mipha-slurm")).start()
    print(f"export SLURM_CONF={cluster.conf}")
