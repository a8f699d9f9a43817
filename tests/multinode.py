"""A Ray cluster of several nodes on this machine, for the fault tests (tests/test_faults.py) and bench/faults.py.

Every node is a `ray start --block` subprocess with its own ports, temp folder and the cluster's auth token: a
head with no CPUs (it hosts the drivers, which attach to the head, and with them Ray Train's and Serve's
controllers) and worker nodes with 1 CPU and a 100 MB object store each. The head's GCS declares a node dead
after about 3 s without an answer to its health checks (RAY_health_check_*: 1 s period and timeout, 3 misses).
`kill_node` SIGKILLs a worker node's whole process tree (raylet, its agents and workers) at once, as a node lost
to the hardware or a spot reclaim; `replace_dead` starts fresh nodes until the cluster is whole again.
Nothing here runs `ray stop`: only the processes started here are ever signalled.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import yaml

from pfsr.config import ServeConfig
from pfsr.pipeline.proxy import proxy_env

REPO = Path(__file__).resolve().parents[1]
HEALTH_CHECK = {"RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_period_ms": "1000",
                "RAY_health_check_timeout_ms": "1000", "RAY_health_check_failure_threshold": "3"}
OBJECT_STORE_BYTES = 100 * 1024 * 1024
STARTS = 3  # tries to start a node
_NODES_PROBE = """
import json, sys
from ray._raylet import GcsClient
infos = GcsClient(address=sys.argv[1]).get_all_node_info(timeout=20).values()
print(json.dumps([{"port": i.node_manager_port, "alive": i.state == 0, "head": i.is_head_node,
                   "resources": dict(i.resources_total)} for i in infos]))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parents() -> dict[int, int]:
    """pid -> parent pid of every process (from /proc)."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                out[int(entry)] = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
    return out


def descendants(pid: int) -> list[int]:
    tree = parents()
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        children = [p for p, pp in tree.items() if pp == parent]
        out += children
        todo += children
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.5,
             alive: Optional[Callable[[], bool]] = None):
    """Poll until predicate() is truthy (returns it); AssertionError after `timeout` s or once alive() is false."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline or (alive is not None and not alive()):
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(interval)
    return value


class LocalCluster:
    """A head and `workers` worker nodes; `env` for drivers (`run`/`popen`) and for anything that talks to it."""

    def __init__(self, root: Path, workers: int = 3, extra_env: Optional[dict[str, str]] = None,
                 autoscaling_config: Optional[Path] = None):
        """`autoscaling_config`: a fake_multinode cluster YAML (cluster/fake_multinode.yaml); the head then runs
        the v1 autoscaler with Ray's fake provider, which starts and ends worker nodes itself."""
        self.root = Path(root)
        self.temp_dir = f"/tmp/pfsr-mn-{secrets.token_hex(4)}"  # short: Ray's socket paths live below it
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
                "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", "OMP_NUM_THREADS": "1",
                "PYTHONPATH": os.pathsep.join([str(REPO / "platform"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"}
        env |= proxy_env(ServeConfig()) | (extra_env or {})  # PF-SR's layer in every node's Serve proxy, as aws.yaml
        self.env = env
        self.gcs_port = free_port()
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.env_for_drivers = env | {"RAY_ADDRESS": self.address}
        self.procs: dict[str, subprocess.Popen] = {}
        self.ports: dict[str, int] = {}  # node name -> node manager port (how the GCS names it here)
        self.killed: list[str] = []
        self._count = 0
        self._logs: list = []
        head_args, head_env = [], env | HEALTH_CHECK
        if autoscaling_config is not None:
            config = yaml.safe_load(Path(autoscaling_config).read_text())
            config["provider"]["gcs_address"] = self.address
            self.root.mkdir(parents=True, exist_ok=True)
            (self.root / "autoscaling.yaml").write_text(yaml.safe_dump(config))
            head_args = ["--autoscaling-config", str(self.root / "autoscaling.yaml")]
            head_env |= {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
        try:
            for _ in range(STARTS):
                self._start("head", ["--head", "--port", str(self.gcs_port), "--num-cpus", "0",
                                     "--include-dashboard", "false", "--dashboard-port", str(free_port()),
                                     "--ray-client-server-port", str(free_port()), "--disable-usage-stats",
                                     *head_args], head_env)
                if self._started("head", lambda: any(n["head"] and n["alive"] for n in self._probe(quiet=True))):
                    break
            else:
                raise AssertionError(f"the Ray head did not start {STARTS} times: {self.root / 'head.log'}")
            for _ in range(workers):  # one at a time: nodes starting together time out on 2 cores
                self.add_node()
        except BaseException:
            self.shutdown()
            raise

    def _started(self, name: str, up: Callable[[], bool]) -> bool:
        """Wait until up(); False when the node's `ray start` gave up first (Ray waits only 30 s for a raylet
        to register, which a machine under load can exceed): its leftovers are then ended."""
        proc, seen = self.procs[name], set()

        def alive() -> bool:
            seen.update(descendants(proc.pid))
            return proc.poll() is None

        try:
            wait_for(up, 600, f"node {name}", interval=1, alive=alive)
            return True
        except AssertionError:
            if proc.poll() is None:
                raise
            for pid in seen:
                if self.temp_dir in cmdline(pid):  # still the process seen, not a new one under its pid
                    _kill(pid)
            return False

    def _start(self, name: str, args: list[str], env: dict[str, str]) -> str:
        self.root.mkdir(parents=True, exist_ok=True)
        log = open(self.root / f"{name}.log", "w")
        self._logs.append(log)
        self.ports[name] = free_port()
        self.procs[name] = subprocess.Popen(
            ["ray", "start", "--block", *args, "--temp-dir", self.temp_dir,
             "--object-store-memory", str(OBJECT_STORE_BYTES), "--node-manager-port", str(self.ports[name]),
             "--object-manager-port", str(free_port()), "--metrics-export-port", str(free_port()),
             "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
             "--runtime-env-agent-port", str(free_port()), "--min-worker-port", "0", "--max-worker-port", "0"],
            env=env, stdout=log, stderr=subprocess.STDOUT)
        return name

    def add_node(self) -> str:
        """Start one more worker node (1 CPU) and wait until the GCS holds it alive; returns its name."""
        for _ in range(STARTS):
            self._count += 1
            name = self._start(f"w{self._count}", ["--address", self.address, "--num-cpus", "1"], self.env)
            if self._started(name, lambda: name in self.alive_workers(quiet=True)):
                return name
        raise AssertionError(f"a worker node did not start {STARTS} times: {self.root}")

    def _probe(self, quiet: bool = False) -> list[dict]:
        """The GCS's node table; `quiet`: [] while the GCS does not answer."""
        try:
            out = subprocess.run([sys.executable, "-c", _NODES_PROBE, self.address], env=self.env,
                                 capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            if quiet:
                return []
            raise
        if out.returncode:
            if quiet:
                return []
            raise AssertionError(out.stderr[-2000:])
        return json.loads(out.stdout)

    def alive_workers(self, quiet: bool = False) -> list[str]:
        """Names of the worker nodes the GCS holds alive."""
        by_port = {port: name for name, port in self.ports.items()}
        return sorted(by_port[n["port"]] for n in self._probe(quiet) if n["alive"] and not n["head"]
                      and n["port"] in by_port)

    def worker_node_resources(self) -> list[dict[str, float]]:
        """Total resources of each alive worker node, those started here and those an autoscaler started."""
        return [n["resources"] for n in self._probe() if n["alive"] and not n["head"]]

    def wait_alive(self, count: int, timeout: float = 300) -> list[str]:
        return wait_for(lambda: alive if len(alive := self.alive_workers()) == count else None, timeout,
                        f"{count} alive worker nodes", interval=1)

    def processes(self, marker: str) -> dict[str, list[int]]:
        """node name -> pids of its processes whose command line holds `marker` (e.g. a Ray actor's class)."""
        out: dict[str, list[int]] = {}
        for name, proc in self.procs.items():
            if proc.poll() is None:
                found = [p for p in descendants(proc.pid) if marker in cmdline(p)]
                if found:
                    out[name] = found
        return out

    def kill_node(self, name: str) -> float:
        """SIGKILL a worker node's `ray start`, raylet, agents and workers at once; returns time.monotonic()."""
        assert name != "head", "the head hosts the drivers: never killed"
        proc = self.procs[name]
        pids = [proc.pid] + descendants(proc.pid)
        for pid in pids:
            _kill(pid)
        proc.wait()
        self.killed.append(name)
        return time.monotonic()

    def replace_dead(self, count: int) -> list[str]:
        """Start worker nodes in place of killed ones until `count` are alive (waits for the GCS)."""
        alive = [n for n, p in self.procs.items() if n != "head" and p.poll() is None]
        for _ in range(count - len(alive)):
            self.add_node()
        return self.wait_alive(count)

    def popen(self, args: list[str], log: Path, **kwargs) -> subprocess.Popen:
        """A driver on the head: `python -m pfsr ARGS` (RAY_ADDRESS points at this cluster)."""
        out = open(log, "w")
        self._logs.append(out)
        return subprocess.Popen([sys.executable, "-m", "pfsr", *args], env=self.env_for_drivers, stdout=out,
                                stderr=subprocess.STDOUT, cwd=REPO, **kwargs)

    def shutdown(self) -> None:
        """SIGTERM the nodes (workers first, head last), then SIGKILL whatever of theirs is left."""
        started = {name: descendants(p.pid) for name, p in self.procs.items()}
        for name in [n for n in self.procs if n != "head"] + ["head"]:
            proc = self.procs[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        for name, proc in self.procs.items():
            for pid in started[name] + descendants(proc.pid):
                _kill(pid)
        self._kill_leftovers()
        for log in self._logs:
            log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def _kill_leftovers(self) -> None:
        """SIGKILL whatever of this cluster still runs (Ray's processes name the cluster's own temp folder on
        their command line)."""
        for pid in parents():
            if self.temp_dir in cmdline(pid):
                _kill(pid)
