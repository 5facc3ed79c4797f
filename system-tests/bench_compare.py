#!/usr/bin/env python3
"""`make bench-compare`: the lb-agent path against a function called directly and through nginx.

Python 3.11 standard library only. Not a test: it measures and prints, and is not part of
`make test`. Three paths to the same function binary, the same body, the same load
generator (oha), side by side in one run:

  direct  oha --unix-socket <sock> POST /call, with the http-stream headers the runner sends,
          to one fn-echo process started by this script;
  nginx   oha -> nginx (Debian's, started here with its own config) -> the same fn-echo socket
          (upstream keepalive, HTTP/1.1, the http-stream headers set with proxy_set_header);
  lb      oha -> lb-agent -> (mTLS gRPC) -> one pure-runner -> fn-echo instances;
  nginx2  (with --nginx-two-hop) the lb path's shape built from nginx: oha -> nginx -> (mutual
          TLS, the same certificates) -> nginx -> the same fn-echo socket.
  nginx2p (with --nginx-two-hop-plain) the same two nginx hops with plain HTTP/1.1 between
          them: what a second hop costs with no TLS at all.
  nginxd  (with --nginx-defaults) the nginx path with nginx's own defaults for buffering
          bodies and answers, as a site with only proxy_pass and keepalive has them (the
          nginx path sets them for large bodies: see NGINX_BODY_TUNING).

For each concurrency: a warm-up per path (not counted), then --rounds rounds that alternate
the paths (direct, nginx, lb, direct, ...); the best round (highest RPS) of each path is
reported. Around every round the CPU time (utime+stime from /proc/PID/stat) of the
processes involved is read, and divided by the round's successful calls. Separate short
rounds under `strace -f -c` count syscalls per call of lb-agent and pure-runner. At the end,
peak RSS (VmHWM). A "big" row sends --big-mib MiB through fn-hello (which reads the whole
body, then answers) at c=8 on all three paths.

Run `python3 system-tests/bench_compare.py --help` for the flags. Everything it starts is
stopped on exit, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import re
import shlex
import shutil
import signal
import socket
import statistics
import string
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
FAR_DEADLINE = "2099-12-31T23:59:59.000Z"
BIG_CONCURRENCY = 8
# The catalog's memory_mb for the bench functions, and the least FN_MAX_MEMORY_MB of a runner.
FN_MEMORY_MB = 64
MIN_RUNNER_MEMORY_MB = 8192
# Paths served by the nginx this script starts (one process group for CPU figures).
NGINX_PATHS = ("nginx", "nginx2", "nginx2p", "nginxd")
# The nginx paths besides the first, each compared with it and with the lb path.
OTHER_NGINX_PATHS = ("nginx2", "nginx2p", "nginxd")
# What the nginx path (and the two-hop paths) set for large bodies, where nginx's defaults
# (8 KiB of request body and 8 x 4 KiB of answer in memory) write a 1 MiB call's body and
# answer to temp files: the request body streamed upstream as it comes, the answer held in
# memory. nginxd keeps the defaults.
NGINX_BODY_TUNING = """        client_body_buffer_size 1m;
        proxy_request_buffering off;
        proxy_buffering on;
        proxy_buffers 16 64k;
        proxy_buffer_size 16k;"""

# Processes this script started (Popen), stopped in reverse order on exit.
STARTED: list[tuple[str, subprocess.Popen]] = []
# pids of function instances the runner started, seen during the run (killed if left over).
RUNNER_CHILDREN: dict[int, str] = {}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


# ---------------------------------------------------------------------------- arguments


def parse_duration(text: str) -> float:
    """`5s`, `500ms`, `1m`, `2.5` (seconds) -> seconds."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s|m)?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (use 5s, 500ms, 1m)")
    value = float(m.group(1))
    unit = m.group(2) or "s"
    return value / 1000 if unit == "ms" else value * 60 if unit == "m" else value


def parse_concurrency(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("concurrency values must be >= 1")
    return values


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench_compare.py",
        description="Compare direct / nginx / lb-agent paths to the same function with oha.",
    )
    p.add_argument("--duration", type=parse_duration, default=5.0,
                   help="length of one measured round (default 5s)")
    p.add_argument("--warmup", type=parse_duration, default=2.0,
                   help="warm-up per path and concurrency, not counted (default 2s)")
    p.add_argument("--rounds", type=int, default=3,
                   help="measured rounds per path and concurrency; the best is kept (default 3)")
    p.add_argument("--concurrency", type=parse_concurrency, default=[1, 64],
                   help="comma-separated concurrencies (default 1,64)")
    p.add_argument("--fn-concurrency", type=int, default=1,
                   help="the catalog's `concurrency` for the functions behind the LB: calls one "
                        "instance takes at once (default 1, Fn's one call per instance)")
    p.add_argument("--worker-threads", type=int, default=None,
                   help="FN_WORKER_THREADS of lb-agent and pure-runner (default: unset, so each "
                        "uses all CPUs)")
    p.add_argument("--shards", type=int, default=None,
                   help="FN_SHARDS of lb-agent and pure-runner: event-loop threads, each "
                        "serving its share of the connections (default: unset, so one; more "
                        "than one needs --worker-threads 1)")
    p.add_argument("--placer", choices=["warm", "ch", "naive"], default=None,
                   help="FN_PLACER of lb-agent (default: unset, so the lb-agent's default)")
    p.add_argument("--insecure", action="store_true",
                   help="run lb-agent -> pure-runner with FN_INSECURE=true (plaintext gRPC) to "
                        "measure what mutual TLS costs; never a deployment setting")
    p.add_argument("--body-size", type=int, default=1024,
                   help="request body in bytes for the echo rows, random bytes (default 1024)")
    p.add_argument("--big-mib", type=float, default=1.0,
                   help="MiB sent through fn-hello at c=8 in the big row; 0 skips it (default 1)")
    p.add_argument("--big-rounds", type=int, default=None,
                   help="measured rounds of the big row (default: --rounds minus 1, at least 1)")
    p.add_argument("--nginx-two-hop", action="store_true",
                   help="add a path of the dataplane's shape built from nginx: nginx -> mutual "
                        "TLS -> nginx -> the same socket (what two proxy hops with mTLS "
                        "between them cost, next to the lb path)")
    p.add_argument("--nginx-two-hop-plain", action="store_true",
                   help="add two nginx hops with plain HTTP/1.1 between them (nginx -> nginx -> "
                        "the same socket): what a second hop costs before any TLS")
    p.add_argument("--nginx-defaults", action="store_true",
                   help="add the nginx path with nginx's own defaults for buffering bodies and "
                        "answers (the request body read whole before it goes upstream, to a "
                        "temp file beyond 8 KiB; answers beyond 8 x 4 KiB to temp files), as a "
                        "site with only proxy_pass and keepalive has them")
    p.add_argument("--pin-daemons", action="store_true",
                   help="a diagnostic of the kernel's placement, never a deployment setting: "
                        "before each lb round, pin lb-agent's threads to the first CPU and "
                        "pure-runner's to the second, and let the function processes run on "
                        "every CPU (instances started during a round stay on the runner's CPU "
                        "until the next)")
    p.add_argument("--no-strace", action="store_true", help="skip the syscall rounds")
    p.add_argument("--strace-calls", type=int, default=5000,
                   help="calls per syscall-counting round (default 5000)")
    p.add_argument("--nginx-workers", default="auto",
                   help="nginx worker_processes (default auto = one per CPU, like tokio's "
                        "default worker threads in lb-agent)")
    p.add_argument("--bin-dir", type=Path, default=REPO / "target" / "dist",
                   help="where lb-agent, pure-runner, fn-certs, fn-echo, fn-hello are "
                        "(default target/dist: the shipped build, see Cargo.toml)")
    p.add_argument("--json-out", type=Path, default=None, help="also write all figures as JSON")
    p.add_argument("--keep-tmp", action="store_true",
                   help="keep the temp directory (logs, configs) instead of removing it")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    if args.body_size < 0:
        p.error("--body-size must be >= 0")
    if args.worker_threads is not None and args.worker_threads < 1:
        p.error("--worker-threads must be >= 1")
    if args.shards is not None and not 1 <= args.shards <= 256:
        p.error("--shards must be between 1 and 256")
    if (args.shards or 1) > 1 and args.worker_threads != 1:
        p.error("--shards above 1 needs --worker-threads 1 (each shard is one thread)")
    if not 1 <= args.fn_concurrency <= 1000:
        p.error("--fn-concurrency must be between 1 and 1000")
    if args.big_rounds is None:
        args.big_rounds = max(1, args.rounds - 1)
    if args.pin_daemons and len(os.sched_getaffinity(0)) < 2:
        p.error("--pin-daemons needs at least two CPUs")
    return args


# ---------------------------------------------------------------------------- tools


def run_quiet(argv: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, **kw)


def apt_install(package: str, why: str) -> None:
    if os.geteuid() != 0:
        raise BenchError(f"{why}; install it (apt-get install {package}) or run as root")
    log(f"{why}: installing Debian package {package} with apt-get")
    print(f"note: installed {package} with apt-get ({why})", flush=True)
    subprocess.run(["apt-get", "update", "-qq"], check=False, stdout=subprocess.DEVNULL)
    r = subprocess.run(["apt-get", "install", "-y", "-qq", package],
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if r.returncode != 0:
        raise BenchError(f"apt-get install {package} failed")


def find_oha() -> str:
    found = shutil.which("oha")
    cargo_bin = Path.home() / ".cargo" / "bin" / "oha"
    if not found and cargo_bin.is_file():
        found = str(cargo_bin)
    if found:
        return found
    log("oha not found on PATH nor in ~/.cargo/bin: installing it with `cargo install oha` "
        "(takes a few minutes)")
    print("note: installed oha with `cargo install oha --locked`", flush=True)
    r = subprocess.run(["cargo", "install", "oha", "--locked"])
    if r.returncode != 0 or not cargo_bin.is_file():
        raise BenchError("cargo install oha failed")
    return str(cargo_bin)


def find_nginx() -> str:
    for candidate in (shutil.which("nginx"), "/usr/sbin/nginx"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    apt_install("nginx-light", "nginx is missing")
    for candidate in (shutil.which("nginx"), "/usr/sbin/nginx"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise BenchError("nginx still missing after apt-get install nginx-light")


def find_strace() -> str | None:
    found = shutil.which("strace")
    if found:
        return found
    try:
        apt_install("strace", "strace is missing (needed for syscalls per call; --no-strace skips)")
    except BenchError as e:
        log(f"no strace: {e}; skipping the syscall rounds")
        return None
    return shutil.which("strace")


@dataclass
class Oha:
    path: str
    version: str
    json_flag: list[str]
    wait_flag: list[str]

    @classmethod
    def detect(cls, path: str) -> "Oha":
        helptext = run_quiet([path, "--help"]).stdout
        version = run_quiet([path, "--version"]).stdout.strip()
        if "--output-format" in helptext:
            json_flag = ["--output-format", "json"]
        elif "--json" in helptext:
            json_flag = ["--json"]
        else:
            raise BenchError(f"{path} ({version}) has no JSON output option")
        if "--unix-socket" not in helptext:
            raise BenchError(f"{path} ({version}) has no --unix-socket option")
        # Without it, the calls in flight when -z ends are counted as errors ("aborted due to
        # deadline"), which would show as errors on every path.
        wait = ["--wait-ongoing-requests-after-deadline"] if (
            "--wait-ongoing-requests-after-deadline" in helptext) else []
        return cls(path, version, json_flag, wait)


# ---------------------------------------------------------------------------- /proc


def proc_stat(pid: int) -> tuple[int, int] | None:
    """(utime+stime in ticks, ppid), or None if the process is gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = data[data.rindex(")") + 2:].split()
    # rest[0] is field 3 (state): ppid is field 4, utime 14, stime 15.
    return int(rest[11]) + int(rest[12]), int(rest[1])


def children_of(ppid: int) -> list[int]:
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        st = proc_stat(int(entry.name))
        if st and st[1] == ppid:
            out.append(int(entry.name))
    return out


def descendants_of(root: int) -> list[int]:
    """Every process below `root` (children, their children...), from one scan of /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        st = proc_stat(int(entry.name))
        if st:
            children.setdefault(st[1], []).append(int(entry.name))
    out, frontier = [], [root]
    while frontier:
        found = children.get(frontier.pop(), [])
        out.extend(found)
        frontier.extend(found)
    return out


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def vm_hwm_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


# Process groups whose CPU is measured: name -> function returning current pids.
Groups = dict[str, "callable"]


def cpu_ticks(pid: int) -> int | None:
    st = proc_stat(pid)
    return st[0] if st else None


def machine_jiffies() -> tuple[int, int]:
    """(idle + iowait, all) jiffies of every CPU together, from the first line of /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return fields[3] + fields[4], sum(fields[:8])


def runq_wait_ns(pid: int) -> int | None:
    """Nanoseconds the threads of `pid` have spent runnable but waiting for a CPU (the second
    field of /proc/PID/task/TID/schedstat), summed; threads that ended are not counted."""
    try:
        tasks = list(os.scandir(f"/proc/{pid}/task"))
    except OSError:
        return None
    total = 0
    for t in tasks:
        try:
            total += int(Path(t.path, "schedstat").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            pass
    return total


def snapshot(groups: dict, read) -> dict[str, dict[int, int]]:
    """`read(pid)` (a counter) of every process of every group; processes gone are left out."""
    return {name: {pid: v for pid in pids_fn() if (v := read(pid)) is not None}
            for name, pids_fn in groups.items()}


def growth(before: dict, after: dict) -> dict[str, int]:
    """How much each group's counters grew between two snapshots (a pid new in `after` counts
    from 0)."""
    return {name: sum(max(0, v - before.get(name, {}).get(pid, 0)) for pid, v in per.items())
            for name, per in after.items()}


# ---------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FN_")}
    env.update(extra)
    return env


def start(name: str, argv: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    logf = open(log_path, "wb")
    proc = subprocess.Popen(argv, env=env, stdout=logf, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    logf.close()
    STARTED.append((name, proc))
    log(f"started {name} (pid {proc.pid}), log {log_path}")
    return proc


def stop_all() -> None:
    for name, proc in reversed(STARTED):
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 6
    for name, proc in reversed(STARTED):
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log(f"{name} (pid {proc.pid}) did not stop on SIGTERM: SIGKILL")
            proc.kill()
            proc.wait()
    # Function instances the runner started and did not stop (it should have).
    for pid, name in RUNNER_CHILDREN.items():
        if comm(pid) == name:
            try:
                os.kill(pid, signal.SIGKILL)
                log(f"killed left-over function instance {name} (pid {pid})")
            except ProcessLookupError:
                pass
    STARTED.clear()


def tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def wait_for(what: str, check, timeout: float, proc: subprocess.Popen | None = None,
             log_path: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    last_err = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"{what}: process exited with {proc.returncode}; log:\n"
                             f"{tail(log_path) if log_path else ''}")
        try:
            if check():
                return
        except Exception as e:  # noqa: BLE001 - any failure means "not yet"
            last_err = e
        time.sleep(0.05)
    raise BenchError(f"timed out waiting for {what} ({last_err}); log:\n"
                     f"{tail(log_path) if log_path else ''}")


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 10):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


def http_call(conn: http.client.HTTPConnection, method: str, path: str, body: bytes = b"",
              headers: dict | None = None) -> tuple[int, bytes, dict]:
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, data, {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()


# ---------------------------------------------------------------------------- oha


@dataclass
class Target:
    path: str          # direct | nginx | lb
    url: str
    unix_socket: str | None = None
    headers: list[str] = field(default_factory=list)


@dataclass
class RoundResult:
    path: str
    concurrency: int
    ok: int
    non2xx: int
    errors: int
    error_kinds: dict
    seconds: float
    rps: float
    p50_ms: float | None
    p99_ms: float | None
    resp_bytes: float | None
    cpu_us_per_call: dict
    # Share of both CPUs' time that was idle during the round (the whole machine).
    idle_share: float | None = None
    # µs per call each process group spent runnable but waiting for a CPU.
    wait_us_per_call: dict = field(default_factory=dict)

    @property
    def failed(self) -> int:
        return self.non2xx + self.errors


CURRENT: list[subprocess.Popen] = []


def run_oha(oha: Oha, target: Target, concurrency: int, body_file: Path,
            duration: float | None = None, count: int | None = None) -> dict:
    argv = [oha.path, "--no-tui", *oha.json_flag, "-c", str(concurrency), "-m", "POST",
            "-D", str(body_file), "-T", "application/octet-stream"]
    if duration is not None:
        argv += ["-z", f"{max(1, int(duration * 1000))}ms", *oha.wait_flag]
    else:
        argv += ["-n", str(count)]
    for h in target.headers:
        argv += ["-H", h]
    if target.unix_socket:
        argv += ["--unix-socket", target.unix_socket]
    argv.append(target.url)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    CURRENT.append(proc)
    try:
        timeout = (duration or 0) + 120 + (count or 0) / 50
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise BenchError(f"oha against {target.path} did not finish in time")
    finally:
        CURRENT.remove(proc)
    if proc.returncode != 0:
        raise BenchError(f"oha failed ({proc.returncode}) against {target.path}: {err.strip()}"
                         f"\ncommand: {shlex.join(argv)}")
    try:
        return json.loads(out)
    except json.JSONDecodeError:
        raise BenchError(f"oha printed no JSON: {out[:500]!r} {err[:500]!r}") from None


def summarize(raw: dict, target: Target, concurrency: int, cpu_us: dict) -> RoundResult:
    summary = raw.get("summary", {})
    seconds = float(summary.get("total") or 0.0)
    codes = {str(k): int(v) for k, v in (raw.get("statusCodeDistribution") or {}).items()}
    ok = sum(v for k, v in codes.items() if k.startswith("2"))
    non2xx = sum(v for k, v in codes.items() if not k.startswith("2"))
    kinds = {f"HTTP {k}": v for k, v in codes.items() if not k.startswith("2")}
    error_dist = {str(k): int(v) for k, v in (raw.get("errorDistribution") or {}).items()}
    kinds.update(error_dist)
    pct = raw.get("latencyPercentiles") or {}

    def ms(key):
        v = pct.get(key)
        return None if v is None else float(v) * 1000

    per_call = {k: (v / ok if ok else None) for k, v in cpu_us.items()}
    return RoundResult(
        path=target.path, concurrency=concurrency, ok=ok, non2xx=non2xx,
        errors=sum(error_dist.values()), error_kinds=kinds, seconds=seconds,
        rps=ok / seconds if seconds > 0 else 0.0, p50_ms=ms("p50"), p99_ms=ms("p99"),
        resp_bytes=summary.get("sizePerRequest"), cpu_us_per_call=per_call,
    )


# ---------------------------------------------------------------------------- the setups


class Bench:
    def __init__(self, args: argparse.Namespace, oha: Oha, nginx: str, strace: str | None):
        self.args = args
        self.oha = oha
        self.nginx_bin = nginx
        self.strace = strace
        self.bin = args.bin_dir.resolve()
        self.tmp = Path(tempfile.mkdtemp(prefix="fn-bench-", dir="/tmp"))
        os.chmod(self.tmp, 0o755)
        self.logs = self.tmp / "logs"
        self.logs.mkdir()
        self.pids: dict[str, int] = {}
        self.nginx_port = 0
        self.nginx2_port = 0
        self.nginx2p_port = 0
        self.nginxd_port = 0
        self.lb_port = 0
        self.certs = self.tmp / "certs"
        self.paths = ["direct", "nginx", *(["nginx2"] if args.nginx_two_hop else []),
                      *(["nginx2p"] if args.nginx_two_hop_plain else []),
                      *(["nginxd"] if args.nginx_defaults else []), "lb"]
        self.nginx_conf_text = ""
        # "off" runs nginx as one process (bench_instructions.py reads one count).
        self.nginx_master = "on"
        # Multiplies the start-up timeouts (bench_instructions.py runs everything under
        # valgrind, some 50 times slower).
        self.slow = 1

    # -- function processes started directly (shared by the direct and nginx paths)

    def start_function(self, name: str, binary: str) -> str:
        sock_dir = self.tmp / f"d-{name}"
        sock_dir.mkdir(mode=0o755)
        os.chmod(sock_dir, 0o755)
        sock = sock_dir / "lsnr.sock"
        env = clean_env({
            "FN_FORMAT": "http-stream", "FN_LISTENER": f"unix:{sock}", "FN_APP_NAME": "bench",
            "FN_FN_NAME": name, "FN_MEMORY": "128", "FN_TYPE": "sync",
        })
        proc = start(f"{binary} (direct)", [str(self.bin / binary)], env,
                     self.logs / f"direct-{name}.log")
        self.pids[f"direct-{name}"] = proc.pid
        wait_for(f"{binary} socket {sock}", lambda: sock.exists(), 10, proc,
                 self.logs / f"direct-{name}.log")
        status, body, headers = http_call(
            UnixHTTPConnection(str(sock)), "POST", "/call", b"ping",
            {"Content-Type": "text/plain", **dict(
                h.split(": ", 1) for h in self.fn_headers(name))})
        if status != 200 or headers.get("fn-http-status") != "200":
            raise BenchError(f"direct call to {binary} answered {status} "
                             f"(Fn-Http-Status {headers.get('fn-http-status')}): {body[:200]!r}")
        return str(sock)

    @staticmethod
    def fn_headers(name: str) -> list[str]:
        """The http-stream headers the runner puts on POST /call (content type aside)."""
        return [
            "Fn-Call-Id: 01BENCHDIRECTCALL000000000",
            f"Fn-Deadline: {FAR_DEADLINE}",
            "Fn-Http-Method: POST",
            f"Fn-Http-Request-Url: http://127.0.0.1/r/bench/{name}",
            "Fn-Intent: httprequest",
            "Fn-Http-H-Content-Type: application/octet-stream",
        ]

    # -- nginx

    def start_nginx(self, echo_sock: str, hello_sock: str) -> None:
        d = self.tmp / "nginx"
        d.mkdir()
        self.nginx_port = free_port()
        user = "user root;\n" if os.geteuid() == 0 else ""
        fn_headers = "\n".join(
            f"            proxy_set_header {k} {v};" for k, v in [
                ("Fn-Call-Id", "$request_id"),
                ("Fn-Deadline", FAR_DEADLINE),
                ("Fn-Http-Method", "$request_method"),
                ("Fn-Http-Request-Url", '"http://$host$request_uri"'),
                ("Fn-Intent", "httprequest"),
                ("Fn-Http-H-Content-Type", '"$content_type"'),
                ("Connection", '""'),
            ])
        location = """        location = /r/bench/{name} {{
            proxy_pass http://fn_{name}/call;
{fn_headers}
        }}"""
        locations = "\n".join(location.format(name=n, fn_headers=fn_headers)
                              for n in ("echo", "hello"))

        def two_hops(front_port: int, scheme: str, proxy_tls: str, back_tls: str) -> str:
            """A front server proxying /r/bench/ to a back server on the function's socket."""
            back_port = free_port()
            return f"""
    upstream back_{scheme} {{
        server 127.0.0.1:{back_port};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{front_port} reuseport;
{NGINX_BODY_TUNING}
        location /r/bench/ {{
            proxy_pass {scheme}://back_{scheme};{proxy_tls}
            proxy_set_header Connection "";
        }}
    }}
    server {{
        listen 127.0.0.1:{back_port}{" ssl" if back_tls else ""} reuseport;{back_tls}
{NGINX_BODY_TUNING}
{locations}
    }}"""

        two_hop = ""
        defaults = ""
        if self.args.nginx_defaults:
            # The same locations with nginx's compiled-in buffering (client_max_body_size
            # aside, raised for every server so that --big-mib above 1 is not refused), and
            # errors logged at nginx's default level: at `warn` every large call would log
            # that its body and its answer went through temp files.
            self.nginxd_port = free_port()
            defaults = f"""
    server {{
        listen 127.0.0.1:{self.nginxd_port} reuseport;
        error_log {d}/error.log error;
{locations}
    }}"""
        c = self.certs
        if self.args.nginx_two_hop:
            # The dataplane's shape: a front proxy, mutual TLS (the same certificates as
            # lb-agent and pure-runner), a back proxy on the function's socket.
            self.nginx2_port = free_port()
            two_hop += two_hops(self.nginx2_port, "https", f"""
            proxy_ssl_certificate {c / "node.pem"};
            proxy_ssl_certificate_key {c / "node-key.pem"};
            proxy_ssl_trusted_certificate {c / "ca.pem"};
            proxy_ssl_verify on;
            proxy_ssl_name localhost;
            proxy_ssl_session_reuse on;""", f"""
        ssl_certificate {c / "node.pem"};
        ssl_certificate_key {c / "node-key.pem"};
        ssl_client_certificate {c / "ca.pem"};
        ssl_verify_client on;""")
        if self.args.nginx_two_hop_plain:
            # The same two hops with nothing between them but HTTP/1.1 on loopback.
            self.nginx2p_port = free_port()
            two_hop += two_hops(self.nginx2p_port, "http", "", "")
        conf = f"""# generated by system-tests/bench_compare.py
{user}worker_processes {self.args.nginx_workers};
daemon off;
master_process {self.nginx_master};
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 60s;
    client_max_body_size 64m;
    proxy_http_version 1.1;
    upstream fn_echo {{
        server unix:{echo_sock};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    upstream fn_hello {{
        server unix:{hello_sock};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{self.nginx_port} reuseport;
{NGINX_BODY_TUNING}
{locations}
    }}{two_hop}{defaults}
}}
"""
        self.nginx_conf_text = conf
        (d / "nginx.conf").write_text(conf)
        argv = [self.nginx_bin, "-p", str(d), "-e", str(d / "error.log"), "-c",
                str(d / "nginx.conf")]
        t = run_quiet([*argv, "-t"])
        if t.returncode != 0:
            raise BenchError(f"nginx -t failed:\n{t.stderr}")
        proc = start("nginx", argv, clean_env({}), self.logs / "nginx.log")
        self.pids["nginx"] = proc.pid

        def up():
            status, body, _ = http_call(
                http.client.HTTPConnection("127.0.0.1", self.nginx_port, timeout=5 * self.slow),
                "POST", "/r/bench/echo", b"ping", {"Content-Type": "text/plain"})
            if status != 200 or body != b"ping":
                raise BenchError(f"nginx -> fn-echo answered {status} {body[:200]!r}")
            return True

        wait_for("nginx to answer", up, 10 * self.slow, proc, d / "error.log")
        for port, shape in ((self.nginx2_port, "nginx -> mTLS -> nginx"),
                            (self.nginx2p_port, "nginx -> HTTP/1.1 -> nginx"),
                            (self.nginxd_port, "nginx with its default buffering")):
            if not port:
                continue

            def up2(port=port, shape=shape):
                status, body, _ = http_call(
                    http.client.HTTPConnection("127.0.0.1", port, timeout=5 * self.slow),
                    "POST", "/r/bench/echo", b"ping", {"Content-Type": "text/plain"})
                if status != 200 or body != b"ping":
                    raise BenchError(f"{shape} -> fn-echo answered {status} {body[:200]!r}")
                return True

            wait_for(f"{shape} to answer", up2, 10 * self.slow, proc, d / "error.log")

    def nginx_pids(self) -> list[int]:
        master = self.pids["nginx"]
        return [master, *children_of(master)]

    # -- lb-agent -> pure-runner

    def make_certs(self) -> None:
        r = run_quiet([str(self.bin / "fn-certs"), "--out", str(self.certs)])
        if r.returncode != 0:
            raise BenchError(f"fn-certs failed: {r.stderr}")

    def start_lb(self) -> None:
        certs = self.certs
        cert_env = {
            "FN_NODE_CERT_AUTHORITY": str(certs / "ca.pem"),
            "FN_NODE_CERT": str(certs / "node.pem"),
            "FN_NODE_CERT_KEY": str(certs / "node-key.pem"),
        }
        if self.args.insecure:
            cert_env = {"FN_INSECURE": "true"}
        functions = self.tmp / "functions"
        functions.mkdir(mode=0o755)
        os.chmod(functions, 0o755)
        for f in ("fn-echo", "fn-hello"):
            shutil.copy2(self.bin / f, functions / f)
            os.chmod(functions / f, 0o755)
        sockets = self.tmp / "rs"
        sockets.mkdir(mode=0o755)
        os.chmod(sockets, 0o755)

        grpc_port = free_port()
        runner = start("pure-runner", [str(self.bin / "pure-runner")], clean_env({
            **cert_env,
            "FN_GRPC_PORT": str(grpc_port),
            "FN_LISTEN_ADDR": "127.0.0.1",
            "FN_FUNCTIONS_DIR": str(functions),
            "FN_SOCKET_DIR": str(sockets),
            "FN_MAX_MEMORY_MB": str(self.runner_memory_mb()),
            "FN_LOG_LEVEL": "warn",
            "FN_SHUTDOWN_TIMEOUT": "3s",
            **self.threads_env(),
        }), self.logs / "pure-runner.log")
        self.pids["pure-runner"] = runner.pid

        catalog = self.tmp / "functions.toml"
        catalog.write_text("".join(f"""
[[functions]]
app = "bench"
name = "{name}"
route = "/{name}"
command = ["fn-{name}"]
memory_mb = {FN_MEMORY_MB}
concurrency = {self.args.fn_concurrency}
timeout = "60s"
idle_timeout = "30m"
""" for name in ("echo", "hello")))
        self.lb_port = free_port()
        lb = start("lb-agent", [str(self.bin / "lb-agent")], clean_env({
            **cert_env,
            "FN_PORT": str(self.lb_port),
            "FN_LISTEN_ADDR": "127.0.0.1",
            "FN_RUNNER_ADDRESSES": f"127.0.0.1:{grpc_port}",
            "FN_FUNCTIONS_FILE": str(catalog),
            "FN_LOG_LEVEL": "warn",
            "FN_SHUTDOWN_TIMEOUT": "3s",
            **({"FN_PLACER": self.args.placer} if self.args.placer else {}),
            **self.threads_env(),
        }), self.logs / "lb-agent.log")
        self.pids["lb-agent"] = lb.pid

        def health():
            status, _, _ = http_call(
                http.client.HTTPConnection("127.0.0.1", self.lb_port, timeout=2 * self.slow), "GET",
                "/health")
            return status == 200

        wait_for("lb-agent GET /health 200", health, 30 * self.slow, lb, self.logs / "lb-agent.log")

        def first_call(name, body, expect):
            def check():
                if runner.poll() is not None:
                    raise BenchError(f"pure-runner exited; log:\n{tail(self.logs / 'pure-runner.log')}")
                status, data, _ = http_call(
                    http.client.HTTPConnection("127.0.0.1", self.lb_port, timeout=15 * self.slow),
                    "POST", f"/r/bench/{name}", body, {"Content-Type": "text/plain"})
                if status != 200 or not expect(data):
                    raise BenchError(f"lb -> {name} answered {status} {data[:200]!r}")
                return True
            return check

        wait_for("a first successful call through lb-agent (echo)",
                 first_call("echo", b"ping", lambda d: d == b"ping"), 30 * self.slow, lb,
                 self.logs / "lb-agent.log")
        wait_for("a first successful call through lb-agent (hello)",
                 first_call("hello", b"Ada", lambda d: d == b"Hello, Ada!\n"), 30 * self.slow, lb,
                 self.logs / "lb-agent.log")

    def runner_memory_mb(self) -> int:
        """Room for an instance per call at the largest concurrency and in the big row, so
        that no row's calls wait for a runner with room (8192 MB held 128 one-call
        instances, so a c=256 row measured waiting, not the call path)."""
        return max(MIN_RUNNER_MEMORY_MB,
                   FN_MEMORY_MB * (max(self.args.concurrency) + BIG_CONCURRENCY))

    def threads_env(self) -> dict[str, str]:
        """FN_WORKER_THREADS and FN_SHARDS of both daemons, those the flags set."""
        env = {}
        if self.args.worker_threads is not None:
            env["FN_WORKER_THREADS"] = str(self.args.worker_threads)
        if self.args.shards is not None:
            env["FN_SHARDS"] = str(self.args.shards)
        return env

    def runner_children(self) -> list[int]:
        # Function instances run under fn-isolate (fn-isolate -> fn-isolate -> function):
        # count every descendant of the runner.
        pids = descendants_of(self.pids["pure-runner"])
        for pid in pids:
            RUNNER_CHILDREN.setdefault(pid, comm(pid))
        return pids

    # -- targets and the processes whose CPU each path uses

    def targets(self, fn: str, socks: dict[str, str]) -> dict[str, Target]:
        return {
            "direct": Target("direct", "http://localhost/call", socks[fn], self.fn_headers(fn)),
            "nginx": Target("nginx", f"http://127.0.0.1:{self.nginx_port}/r/bench/{fn}"),
            "nginx2": Target("nginx2", f"http://127.0.0.1:{self.nginx2_port}/r/bench/{fn}"),
            "nginx2p": Target("nginx2p", f"http://127.0.0.1:{self.nginx2p_port}/r/bench/{fn}"),
            "nginxd": Target("nginxd", f"http://127.0.0.1:{self.nginxd_port}/r/bench/{fn}"),
            "lb": Target("lb", f"http://127.0.0.1:{self.lb_port}/r/bench/{fn}"),
        }

    def cpu_groups(self, path: str, fn: str) -> dict:
        direct_fn = self.pids[f"direct-{fn}"]
        if path == "direct":
            return {f"fn-{fn}": lambda: [direct_fn]}
        if path in NGINX_PATHS:
            return {"nginx": self.nginx_pids, f"fn-{fn}": lambda: [direct_fn]}
        return {
            "lb-agent": lambda: [self.pids["lb-agent"]],
            "pure-runner": lambda: [self.pids["pure-runner"]],
            f"fn-{fn}": self.runner_children,
        }

    def check_alive(self) -> None:
        for name, proc in STARTED:
            if proc.poll() is not None:
                raise BenchError(f"{name} (pid {proc.pid}) exited with {proc.returncode}")

    def pin_daemons(self) -> None:
        """--pin-daemons: lb-agent's threads on one CPU, pure-runner's on another, the functions
        (which inherit the runner's affinity when it starts them) back on every CPU."""
        cpus = sorted(os.sched_getaffinity(0))
        placement = [("lb-agent", {cpus[0]}), ("pure-runner", {cpus[1]})]
        placement += [(pid, set(cpus)) for pid in descendants_of(self.pids["pure-runner"])]
        for who, mask in placement:
            pid = self.pids[who] if isinstance(who, str) else who
            try:
                tids = [int(t.name) for t in os.scandir(f"/proc/{pid}/task")]
            except OSError:
                continue
            for tid in tids:
                try:
                    os.sched_setaffinity(tid, mask)
                except OSError:
                    pass  # the thread ended in between

    def measured_round(self, target: Target, fn: str, concurrency: int, body: Path,
                       duration: float) -> RoundResult:
        self.check_alive()
        if self.args.pin_daemons and target.path == "lb":
            self.pin_daemons()
        groups = self.cpu_groups(target.path, fn)
        ticks, waits, jiffies = snapshot(groups, cpu_ticks), snapshot(groups, runq_wait_ns), \
            machine_jiffies()
        raw = run_oha(self.oha, target, concurrency, body, duration=duration)
        cpu_us = {k: v * 1e6 / CLK_TCK for k, v in growth(ticks, snapshot(groups, cpu_ticks)).items()}
        wait_ns = growth(waits, snapshot(groups, runq_wait_ns))
        idle, total = (a - b for a, b in zip(machine_jiffies(), jiffies))
        res = summarize(raw, target, concurrency, cpu_us)
        res.idle_share = idle / total if total > 0 else None
        res.wait_us_per_call = {k: (v / 1000 / res.ok if res.ok else None)
                                for k, v in wait_ns.items()}
        log(f"  {target.path:6} c={concurrency:<3} {res.rps:9.0f} rps  p50 "
            f"{fmt_ms(res.p50_ms)} ms  p99 {fmt_ms(res.p99_ms)} ms  failed {res.failed}")
        return res

    def compare(self, fn: str, socks: dict, concurrency: int, body: Path, rounds: int,
                label: str) -> dict[str, list[RoundResult]]:
        targets = self.targets(fn, socks)
        order = self.paths
        log(f"{label} c={concurrency}: warm-up {self.args.warmup:g}s per path")
        for p in order:
            if self.args.pin_daemons and p == "lb":
                self.pin_daemons()
            raw = run_oha(self.oha, targets[p], concurrency, body, duration=self.args.warmup)
            w = summarize(raw, targets[p], concurrency, {})
            if w.failed:
                log(f"  warm-up {p}: {w.failed} failed calls {w.error_kinds}")
        results: dict[str, list[RoundResult]] = {p: [] for p in order}
        for r in range(rounds):
            log(f"{label} c={concurrency}: round {r + 1}/{rounds}")
            for p in order:
                results[p].append(self.measured_round(targets[p], fn, concurrency, body,
                                                      self.args.duration))
        return results

    # -- syscalls

    def strace_round(self, daemon: str, concurrency: int, target: Target, body: Path) -> dict:
        out = self.tmp / f"strace-{daemon}-c{concurrency}.txt"
        errf = open(self.logs / f"strace-{daemon}-c{concurrency}.log", "w+")
        st = subprocess.Popen([self.strace, "-f", "-c", "-o", str(out), "-p",
                               str(self.pids[daemon])], stdout=subprocess.DEVNULL,
                              stderr=errf, stdin=subprocess.DEVNULL, start_new_session=True)
        CURRENT.append(st)
        try:
            # Attached once it has said so for the process (its threads follow).
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                errf.seek(0)
                if "attached" in errf.read() or st.poll() is not None:
                    break
                time.sleep(0.05)
            time.sleep(0.3)
            if st.poll() is not None:
                errf.seek(0)
                raise BenchError(f"strace exited at once: {errf.read()[-500:]}")
            raw = run_oha(self.oha, target, concurrency, body, count=self.args.strace_calls)
            st.send_signal(signal.SIGINT)
            st.wait(timeout=30)
        finally:
            if st.poll() is None:
                st.kill()
                st.wait()
            CURRENT.remove(st)
            errf.close()
        res = summarize(raw, target, concurrency, {})
        calls, total = parse_strace_summary(out.read_text() if out.exists() else "")
        per_call = {k: v / res.ok for k, v in calls.items()} if res.ok else {}
        top = sorted(per_call.items(), key=lambda kv: -kv[1])[:5]
        return {"daemon": daemon, "concurrency": concurrency, "calls": res.ok,
                "failed": res.failed, "total_per_call": (total / res.ok) if res.ok else None,
                "top5": top, "all_per_call": per_call}


def parse_strace_summary(text: str) -> tuple[dict[str, int], int]:
    """Per-syscall counts and the total from `strace -c` output.

    Columns are right-aligned under the header `% time  seconds  usecs/call  calls  errors
    syscall`, and some cells (usecs/call on the total line in older versions, errors) may be
    blank, so the calls column is read by its position under the header.
    """
    calls: dict[str, int] = {}
    total = 0
    start = end = None
    for line in text.splitlines():
        if line.lstrip().startswith("% time"):
            end = line.index("calls") + len("calls")
            start = line.index("usecs/call") + len("usecs/call")
            continue
        if end is None or not line.strip() or line.lstrip().startswith("-"):
            continue
        cell = line[start:end].strip()
        if not cell.isdigit():
            continue
        name = line.split()[-1]
        if name == "total":
            total = int(cell)
        else:
            calls[name] = int(cell)
    if not total:
        total = sum(calls.values())
    return calls, total


# ---------------------------------------------------------------------------- output


def fmt_ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}" if v < 10 else f"{v:.1f}"


def fmt_num(v: float | None, digits: int = 0) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def best(rounds: list[RoundResult]) -> RoundResult:
    return max(rounds, key=lambda r: r.rps)


def median_of(rounds: list[RoundResult], get) -> float | None:
    vals = [v for v in (get(r) for r in rounds) if v is not None]
    return statistics.median(vals) if vals else None


def median_cpu(rounds: list[RoundResult], key: str) -> float | None:
    return median_of(rounds, lambda r: r.cpu_us_per_call.get(key))


def busy_ms_per_call(r: RoundResult) -> float | None:
    """Milliseconds of CPU the whole machine was busy per 2xx call during a round: every CPU's
    non-idle time (the load generator, the kernel's softirqs and other tenants included)."""
    if r.idle_share is None or not r.ok:
        return None
    return (os.cpu_count() or 1) * (1 - r.idle_share) * r.seconds * 1000 / r.ok


def p_big_cpu(p, paths: list[str], big_results: dict[str, list[RoundResult]]) -> None:
    """Where the big row's CPU goes, per path: on a machine with no idle CPU, the paths' busy
    CPU per call bounds their throughput ratio."""
    p("Big row, CPU per call in ms (median over the rounds): the machine's busy CPU per call "
      "(every CPU's non-idle time / 2xx calls), idle share, and each process group's utime+stime")
    rows, busy = [], {}
    for path in paths:
        rs = big_results[path]
        busy[path] = median_of(rs, busy_ms_per_call)
        groups = sorted({k for r in rs for k in r.cpu_us_per_call})
        per_group = ", ".join(f"{g} {fmt_num((median_cpu(rs, g) or 0) / 1000, 2)}"
                              for g in groups)
        idle = median_of(rs, lambda r: r.idle_share)
        rows.append([path, fmt_num(busy[path], 2), "-" if idle is None else f"{100 * idle:.1f}",
                     per_group])
    p(table(["path", "busy ms/call", "idle %", "process groups ms/call"], rows, right={1, 2}))
    if busy.get("lb") and busy.get("nginx"):
        p(f"  nginx's busy CPU per call / lb's: {busy['nginx'] / busy['lb']:.2f} (the lb/nginx "
          "MiB/s ratio that CPU alone allows when both paths keep every CPU busy)")


def table(headers: list[str], rows: list[list[str]], right: set[int] | None = None) -> str:
    right = right if right is not None else set(range(1, len(headers)))
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]

    def line(cells):
        return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def machine_facts() -> dict:
    cpu_model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "memory": mem,
        "kernel": platform.release(),
        "loadavg_start": os.getloadavg(),
    }


def run_facts(command: str, facts: dict, load_end: tuple, elapsed: float) -> list[str]:
    """A report's first lines: the command, the machine, its load (bench_ab.py's too)."""
    la = lambda t: " ".join(f"{x:.2f}" for x in t)  # noqa: E731
    return [
        f"command      {command}",
        f"machine      {facts['nproc']} CPUs ({facts['cpu_model']}), {facts['memory']}, "
        f"kernel {facts['kernel']}",
        f"load average {la(facts['loadavg_start'])} at start, {la(load_end)} at end "
        f"(run took {elapsed:.0f} s; the load generator shares the same CPUs)",
    ]


def git_facts() -> str:
    head = run_quiet(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]).stdout.strip()
    dirty = run_quiet(["git", "-C", str(REPO), "status", "--porcelain", "--", "crates", "bins",
                       "examples"]).stdout.strip()
    return f"{head or '?'}{' (crates/bins/examples have uncommitted changes)' if dirty else ''}"


def bin_facts(bin_dir: Path) -> str:
    parts = []
    for b in ("lb-agent", "pure-runner", "fn-echo"):
        try:
            t = time.strftime("%Y-%m-%d %H:%M", time.localtime((bin_dir / b).stat().st_mtime))
        except OSError:
            t = "missing"
        parts.append(f"{b} {t}")
    return ", ".join(parts)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    command = shlex.join([Path(sys.executable).name, sys.argv[0], *argv])
    facts = machine_facts()
    log(f"start: {facts['nproc']} CPUs, load average {facts['loadavg_start']}")

    for b in ("lb-agent", "pure-runner", "fn-certs", "fn-echo", "fn-hello"):
        if not (args.bin_dir / b).is_file():
            raise BenchError(f"{args.bin_dir / b} missing: run cargo build --profile dist --workspace --bins")
    oha = Oha.detect(find_oha())
    nginx = find_nginx()
    strace = None if args.no_strace else find_strace()
    nginx_version = run_quiet([nginx, "-v"]).stderr.strip().replace("nginx version: ", "")
    strace_version = (run_quiet([strace, "-V"]).stdout.splitlines() or ["?"])[0] if strace else None

    bench = Bench(args, oha, nginx, strace)
    all_out: dict = {"command": command, "machine": facts, "results": {}, "big": None,
                     "syscalls": [], "peak_rss_kib": {}}
    t_start = time.monotonic()
    try:
        rng = random.Random(0xF17)
        body = bench.tmp / "body.bin"
        body.write_bytes(rng.randbytes(args.body_size))
        big_bytes = int(args.big_mib * 1024 * 1024)
        big = bench.tmp / "big.txt"
        if big_bytes:
            # Letters and digits, so that fn-hello's answer ("Hello, <body>!") is the body
            # itself, not a lossy UTF-8 decoding of random bytes (which would triple it).
            alphabet = (string.ascii_letters + string.digits).encode()
            big.write_bytes(bytes(rng.choices(alphabet, k=big_bytes)))

        log("starting fn-echo and fn-hello (direct), nginx, pure-runner and lb-agent")
        bench.make_certs()
        socks = {"echo": bench.start_function("echo", "fn-echo"),
                 "hello": bench.start_function("hello", "fn-hello")}
        bench.start_nginx(socks["echo"], socks["hello"])
        bench.start_lb()
        nginx_workers = len(children_of(bench.pids["nginx"]))

        results: dict[int, dict[str, list[RoundResult]]] = {}
        for c in args.concurrency:
            results[c] = bench.compare("echo", socks, c, body, args.rounds, "echo")

        big_results = None
        if big_bytes:
            big_results = bench.compare("hello", socks, BIG_CONCURRENCY, big, args.big_rounds,
                                        f"big {args.big_mib:g} MiB via fn-hello")

        syscalls = []
        if strace:
            levels = sorted({min(args.concurrency), max(args.concurrency)})
            echo_lb = bench.targets("echo", socks)["lb"]
            for c in levels:
                for daemon in ("lb-agent", "pure-runner"):
                    log(f"syscalls: strace -f -c on {daemon}, {args.strace_calls} calls at c={c}")
                    syscalls.append(bench.strace_round(daemon, c, echo_lb, body))

        rss = {
            "lb-agent": vm_hwm_kib(bench.pids["lb-agent"]),
            "pure-runner": vm_hwm_kib(bench.pids["pure-runner"]),
            "nginx master": vm_hwm_kib(bench.pids["nginx"]),
        }
        workers = children_of(bench.pids["nginx"])
        worker_hwm = [vm_hwm_kib(p) for p in workers]
        rss["nginx workers (max)"] = max((w for w in worker_hwm if w), default=None)
        rss["fn-echo (direct, one process)"] = vm_hwm_kib(bench.pids["direct-echo"])
        # The functions themselves, not what fn-isolate runs beside each (itself twice, and
        # a shell that kills the instance when the runner dies).
        inst = [vm_hwm_kib(p) for p in bench.runner_children()
                if comm(p) not in ("fn-isolate", "sh")]
        inst = [x for x in inst if x]
        rss["fn instances under the runner (max)"] = max(inst, default=None)
        n_instances = len(inst)
        load_end = os.getloadavg()
    finally:
        for p in list(CURRENT):
            if p.poll() is None:
                p.kill()
        stop_all()
        if args.keep_tmp:
            log(f"kept {bench.tmp}")
        else:
            shutil.rmtree(bench.tmp, ignore_errors=True)

    elapsed = time.monotonic() - t_start

    # ------------------------------------------------------------------ the report
    out = []
    p = out.append
    p("== bench-compare: direct fn vs nginx vs lb-agent -> pure-runner ==")
    out.extend(run_facts(command, facts, load_end, elapsed))
    p(f"tools        {oha.version}; nginx {nginx_version}; "
      f"{strace_version or 'strace: not used'}")
    p(f"binaries     {args.bin_dir} ({bin_facts(args.bin_dir)}); git {git_facts()}")
    p("")
    p("method")
    p(f"  echo rows: POST of {args.body_size} random bytes to fn-echo (streams it back). Per "
      f"concurrency: {args.warmup:g} s warm-up per path, then {args.rounds} rounds of "
      f"{args.duration:g} s alternating {', '.join(bench.paths)}; the best round (highest RPS) of each "
      "path is shown.")
    p(f"  lb: the functions' catalog concurrency is {args.fn_concurrency} (calls one instance "
      "takes at once; 1 = one instance per concurrent call); FN_WORKER_THREADS of lb-agent and "
      f"pure-runner: {args.worker_threads or 'unset (all CPUs)'}; FN_SHARDS: "
      f"{args.shards or 'unset (one)'}; gRPC between them: "
      f"{'PLAINTEXT (--insecure)' if args.insecure else 'mutual TLS'}; placer: "
      f"{args.placer or 'the default'}."
      + (" --pin-daemons: lb-agent's threads pinned to one CPU, pure-runner's to another, "
         "before each lb round (a diagnostic, never a deployment setting)."
         if args.pin_daemons else ""))
    p("  RPS = 2xx responses / wall time of the round (oha -z, calls in flight at the end "
      f"{'waited for' if oha.wait_flag else 'aborted'}); p50/p99 from oha; "
      "failed = non-2xx + transport errors.")
    p("  direct: oha --unix-socket to one fn-echo process (FN_FORMAT=http-stream), headers "
      "Fn-Call-Id, Fn-Deadline, Fn-Http-Method, Fn-Http-Request-Url, Fn-Intent, "
      "Fn-Http-H-Content-Type, Content-Type.")
    p(f"  nginx: worker_processes {args.nginx_workers} ({nginx_workers} workers), "
      f"{'user root, ' if os.geteuid() == 0 else ''}access_log off, upstream = the same fn-echo "
      "socket with keepalive 64, proxy_http_version 1.1, Connection \"\", the http-stream headers "
      "by proxy_set_header, proxy_request_buffering off, proxy_buffering on, keepalive_requests "
      "1000000 (client and upstream).")
    p("  lb: lb-agent -> mTLS gRPC -> 1 pure-runner -> fn-echo instances (one call at a time "
      "per instance, so up to c instances; idle_timeout 30m keeps them hot), FN_LOG_LEVEL=warn, "
      "release binaries. direct/nginx share ONE fn-echo process serving all connections.")
    if args.nginx_two_hop:
        p("  nginx2: the lb path's shape built from nginx: a front server proxies over mutual "
          "TLS (the lb's certificates, upstream keepalive 64, session reuse) to a back server "
          "that proxies to the same fn-echo socket as nginx; the same nginx workers serve both.")
    if args.nginx_two_hop_plain:
        p("  nginx2p: the same two nginx servers with plain HTTP/1.1 between them (upstream "
          "keepalive 64): a second hop with no TLS.")
    if args.nginx_defaults:
        p("  nginxd: the nginx path with nginx's compiled-in buffering of bodies and answers "
          "(client_body_buffer_size, proxy_request_buffering on, proxy_buffers and "
          "proxy_buffer_size unset), as a site with only proxy_pass and keepalive has them.")
    p("")

    p("Throughput and latency, echo rows (best round per path)")
    rows = []
    for c, per in results.items():
        for path in bench.paths:
            b = best(per[path])
            total_failed = sum(r.failed for r in per[path])
            rows.append([str(c), path, fmt_num(b.rps), fmt_ms(b.p50_ms), fmt_ms(b.p99_ms),
                         str(b.failed), str(total_failed), fmt_num(sum(r.ok for r in per[path]))])
    p(table(["c", "path", "RPS", "p50 ms", "p99 ms", "failed (best)", "failed (all rounds)",
             "ok calls (all rounds)"], rows, right={0, 2, 3, 4, 5, 6, 7}))
    p("")
    rows = []
    for c, per in results.items():
        d, n, l_ = (best(per[k]) for k in ("direct", "nginx", "lb"))
        ratio = lambda a, b_: f"{a.rps / b_.rps:.2f}" if b_.rps else "-"  # noqa: E731
        two = [ratio(best(per[k]), n) for k in OTHER_NGINX_PATHS if k in per]
        rows.append([str(c), ratio(l_, d), ratio(l_, n), ratio(n, d), *two])
    p("RPS ratios")
    two_head = [f"{k}/nginx" for k in OTHER_NGINX_PATHS if k in bench.paths]
    p(table(["c", "lb/direct", "lb/nginx", "nginx/direct", *two_head], rows,
            right=set(range(4 + len(two_head)))))
    if 1 in results:
        d, n, l_ = (best(results[1][k]) for k in ("direct", "nginx", "lb"))
        if None not in (d.p50_ms, n.p50_ms, l_.p50_ms):
            p(f"added p50 at c=1: lb over direct {l_.p50_ms - d.p50_ms:+.3f} ms; "
              f"nginx over direct {n.p50_ms - d.p50_ms:+.3f} ms; "
              f"lb over nginx {l_.p50_ms - n.p50_ms:+.3f} ms")
    p("")

    p("CPU per successful call, µs (utime+stime from /proc/PID/stat over each measured round "
      "/ its 2xx calls; median over the rounds)")
    rows = []
    for c, per in results.items():
        rows.append([str(c), "direct", "-", "-", "-", fmt_num(median_cpu(per["direct"], "fn-echo"), 1)])
        for path in NGINX_PATHS:
            if path in per:
                rows.append([str(c), path, "-", "-", fmt_num(median_cpu(per[path], "nginx"), 1),
                             fmt_num(median_cpu(per[path], "fn-echo"), 1)])
        rows.append([str(c), "lb", fmt_num(median_cpu(per["lb"], "lb-agent"), 1),
                     fmt_num(median_cpu(per["lb"], "pure-runner"), 1), "-",
                     fmt_num(median_cpu(per["lb"], "fn-echo"), 1)])
    p(table(["c", "path", "lb-agent", "pure-runner", "nginx (all procs)",
             "fn-echo (all instances)"], rows, right={0, 2, 3, 4, 5}))
    p(f"  (clock tick {1e6 / CLK_TCK:.0f} µs; fn-echo under lb = sum over every process below the runner "
      "(the functions and the fn-isolate processes beside them); pure-runner = its own pid only)")
    # This VM's cost per call moves by 2x between hours; ratios to nginx in the same run
    # are what compares across runs.
    for c, per in results.items():
        lb_cpu, runner_cpu = median_cpu(per["lb"], "lb-agent"), median_cpu(per["lb"], "pure-runner")
        ratios = []
        for path in NGINX_PATHS:
            proxy = median_cpu(per[path], "nginx") if path in per else None
            if proxy and lb_cpu is not None and runner_cpu is not None:
                ratios.append(f"x {path}'s: lb-agent {lb_cpu / proxy:.2f}, pure-runner "
                              f"{runner_cpu / proxy:.2f}, both {(lb_cpu + runner_cpu) / proxy:.2f}")
        if ratios:
            p(f"  c={c} CPU per call " + "; ".join(ratios))
    p("")

    p("Idle CPUs and run-queue waits (median over the rounds): the machine's idle share of "
      "both CPUs during a round, and µs per call that each path's processes spent runnable "
      "but waiting for a CPU (schedstat, summed over threads)")
    rows = []
    for c, per in results.items():
        for path in bench.paths:
            groups = sorted({k for r in per[path] for k in r.wait_us_per_call})
            waits = ", ".join(
                f"{g} {fmt_num(median_of(per[path], lambda r: r.wait_us_per_call.get(g)), 1)}"
                for g in groups)
            idle = median_of(per[path], lambda r: r.idle_share)
            rows.append([str(c), path, "-" if idle is None else f"{100 * idle:.1f}", waits or "-"])
    p(table(["c", "path", "idle %", "run-queue wait µs per call"], rows, right={0, 2}))
    p("  (a busy path with CPUs idle while its processes wait to run is limited by where the "
      "kernel places them, not by the CPU its work needs)")
    p("")

    if syscalls:
        p(f"Syscalls per call, lb path (strace -f -c -p PID during {args.strace_calls} calls; "
          "separate rounds, not used for RPS)")
        rows = []
        for s in syscalls:
            top = ", ".join(f"{k} {v:.1f}" for k, v in s["top5"])
            rows.append([str(s["concurrency"]), s["daemon"], fmt_num(s["total_per_call"], 1),
                         str(s["failed"]), top])
        p(table(["c", "daemon", "syscalls/call", "failed", "top 5 per call"], rows,
                right={0, 2, 3}))
        p("")

    p("Peak RSS (VmHWM at the end of the run)")
    rows = [[k, "-" if v is None else f"{v / 1024:.1f} MiB"] for k, v in rss.items()]
    p(table(["process", "VmHWM"], rows, right={1}))
    p(f"  ({n_instances} function instances alive under the runner at the end)")
    p("")

    if big_results:
        p(f"Big row: {big_bytes} bytes ({args.big_mib:g} MiB, letters/digits) POSTed to fn-hello "
          f"at c={BIG_CONCURRENCY}; fn-hello reads the whole body, then answers "
          "\"Hello, <body>!\\n\" (so out = in + 9 bytes)")
        p(f"  {args.warmup:g} s warm-up per path, {args.big_rounds} rounds of {args.duration:g} s, "
          "best shown; nginx: client_max_body_size 64m, client_body_buffer_size 1m, "
          "proxy_request_buffering off (body streamed upstream), proxy_buffering on "
          "(proxy_buffers 16 64k, proxy_buffer_size 16k)")
        p("  MiB/s = (request body bytes + response body bytes) x 2xx calls / wall seconds / 2^20")
        rows = []
        for path in bench.paths:
            b = best(big_results[path])
            resp = b.resp_bytes
            mibs = (big_bytes + (resp or 0)) * b.ok / b.seconds / 2**20 if b.seconds else 0
            b.mib_s = mibs  # type: ignore[attr-defined]
            rows.append([path, str(big_bytes), fmt_num(resp), fmt_num(b.rps, 1), fmt_num(mibs, 1),
                         fmt_ms(b.p50_ms), fmt_ms(b.p99_ms), str(b.failed),
                         str(sum(r.failed for r in big_results[path]))])
        p(table(["path", "in B", "out B", "RPS", "MiB/s in+out", "p50 ms", "p99 ms",
                 "failed (best)", "failed (all)"], rows))
        n_, l_ = best(big_results["nginx"]), best(big_results["lb"])
        d_ = best(big_results["direct"])
        if n_.mib_s and d_.mib_s:  # type: ignore[attr-defined]
            p(f"  lb/nginx {l_.mib_s / n_.mib_s:.2f}; lb/direct {l_.mib_s / d_.mib_s:.2f}")  # type: ignore[attr-defined]
            for k in OTHER_NGINX_PATHS:
                if k in big_results:
                    n2 = best(big_results[k])
                    p(f"  {k}/nginx {n2.mib_s / n_.mib_s:.2f}; lb/{k} "  # type: ignore[attr-defined]
                      f"{l_.mib_s / n2.mib_s:.2f}")  # type: ignore[attr-defined]
        p("")
        p_big_cpu(p, bench.paths, big_results)
        p("")

    kinds = []
    for c, per in results.items():
        for path, rs in per.items():
            for i, r in enumerate(rs):
                if r.error_kinds:
                    kinds.append(f"  echo c={c} {path} round {i + 1}: {r.error_kinds}")
    for path, rs in (big_results or {}).items():
        for i, r in enumerate(rs):
            if r.error_kinds:
                kinds.append(f"  big {path} round {i + 1}: {r.error_kinds}")
    p("Failed calls by kind" if kinds else "No failed call in any measured round.")
    out.extend(kinds)

    report = "\n".join(out)
    print(report, flush=True)

    if args.json_out:
        def rr(r: RoundResult) -> dict:
            d = dict(r.__dict__)
            return d
        all_out["load_end"] = load_end
        all_out["elapsed_s"] = elapsed
        all_out["tools"] = {"oha": oha.version, "nginx": nginx_version, "strace": strace_version}
        all_out["nginx_conf"] = bench.nginx_conf_text
        all_out["results"] = {
            str(c): {path: {"best": rr(best(rs)), "rounds": [rr(r) for r in rs]}
                     for path, rs in per.items()} for c, per in results.items()}
        if big_results:
            all_out["big"] = {"bytes_in": big_bytes, "concurrency": BIG_CONCURRENCY, **{
                path: {"best": rr(best(rs)), "rounds": [rr(r) for r in rs]}
                for path, rs in big_results.items()}}
        all_out["syscalls"] = syscalls
        all_out["peak_rss_kib"] = rss
        all_out["report"] = report
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(all_out, indent=2, default=str))
        log(f"wrote {args.json_out}")
    return 0


def on_sigterm(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        log("interrupted; everything started was stopped")
        sys.exit(130)
    except BenchError as e:
        log(f"error: {e}")
        sys.exit(1)
