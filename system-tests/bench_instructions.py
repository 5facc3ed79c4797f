#!/usr/bin/env python3
"""`make bench-instructions`: user-space instructions per call, counted by callgrind.

Python 3.11 standard library only; valgrind (Debian's, installed when missing) and oha.
Not a test: it measures and prints, and is not part of `make test`.

CPU time per call (what `make bench-compare` reports) moves by a factor of two between this
VM's quiet and busy hours, so a change worth 5% cannot be seen in it. An instruction count
does not move: valgrind's callgrind counts every instruction a process executes in user
space, whatever else the machine is doing. This script runs lb-agent, pure-runner and nginx
under callgrind and sends the same calls through each path at c=1 (oha, 1 KiB POSTs to
fn-echo), twice: a run with the warm-up calls only and one with the measured calls after
them. The difference of the two counts, over the measured calls, is the figure:

  nginx    oha -> nginx -> fn-echo's socket (nginx as one process, `master_process off`,
           as lb-agent is one);
  nginx2   oha -> nginx -> mutual TLS -> nginx -> the same socket (the dataplane's shape);
  lb       oha -> lb-agent -> mutual TLS gRPC -> pure-runner -> fn-echo (each daemon counted).

The functions run natively and are not counted; neither is the kernel (syscalls, wake-ups),
which is about half of each daemon's CPU time (see docs/performance-log.md). Several --bin-dir
give one lb row each, for a before/after comparison in one run.

Under callgrind a daemon runs some 50 times slower, so timers fire where at full speed they
would not: the runner's 2 ms acknowledgement hold, and with the `warm` placer a state report
per call or so where at full speed there is one per 20 ms. Compare builds with the same
flags; `--placer ch` leaves the reports out.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_compare as bc  # noqa: E402


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench_instructions.py",
        description="User-space instructions per call of lb-agent, pure-runner and nginx "
                    "(callgrind).")
    p.add_argument("--calls", type=int, default=2000,
                   help="measured calls per path, at c=1 (default 2000)")
    p.add_argument("--warmup-calls", type=int, default=300,
                   help="calls per path before the measured ones, in both runs (default 300)")
    p.add_argument("--body-size", type=int, default=1024,
                   help="request body in bytes, random (default 1024)")
    p.add_argument("--bin-dir", type=Path, action="append", default=None,
                   help="a build to measure (repeatable: one lb row per build; default "
                        "target/dist)")
    p.add_argument("--worker-threads", type=int, default=1,
                   help="FN_WORKER_THREADS of both daemons (default 1)")
    p.add_argument("--placer", choices=["warm", "ch", "naive"], default=None,
                   help="FN_PLACER of lb-agent (default: the lb-agent's default)")
    p.add_argument("--no-nginx", action="store_true", help="measure the lb rows only")
    p.add_argument("--keep-profiles", type=Path, default=None, metavar="DIR",
                   help="keep each process's callgrind files in DIR (<path>-<process>-"
                        "warmup.out and -measured.out; the calls are their difference): "
                        "read them with callgrind_annotate")
    p.add_argument("--top", type=int, default=0, metavar="N",
                   help="also print, per process, the N functions with the most instructions "
                        "of their own per call (the difference of the two runs' profiles)")
    args = p.parse_args(argv)
    if args.calls < 1 or args.warmup_calls < 0:
        p.error("--calls must be >= 1 and --warmup-calls >= 0")
    args.bin_dir = args.bin_dir or [bc.REPO / "target" / "dist"]
    return args


def find_valgrind() -> str:
    if not shutil.which("valgrind"):
        bc.apt_install("valgrind", "its callgrind counts the instructions")
    valgrind = shutil.which("valgrind")
    if not valgrind:
        raise bc.BenchError("valgrind is needed: apt-get install valgrind")
    return valgrind


class Callgrind:
    """Wrappers that start a program under callgrind, which writes its count when it exits.

    The counters are not read from a running process: `callgrind_control` interrupts a
    process blocked in `epoll_wait` with ptrace, and nginx under valgrind then misses
    connections. Each figure is instead the difference of two runs that differ only in the
    measured calls (see [`measure`]).
    """

    def __init__(self, valgrind: str, out_dir: Path):
        self.valgrind = valgrind
        self.out = out_dir
        self.out.mkdir(parents=True, exist_ok=True)

    def wrapper(self, where: Path, name: str, real: Path) -> Path:
        """An executable `where/name` that runs `real` under callgrind."""
        script = where / name
        argv = [self.valgrind, "--tool=callgrind", "--vgdb=no", "--dump-instr=no",
                "--dump-line=no", f"--callgrind-out-file={self.out}/{name}.%p", str(real)]
        script.write_text(f"#!/bin/sh\nexec {shlex.join(argv)} \"$@\"\n")
        script.chmod(0o755)
        return script

    def total(self, name: str, pid: int) -> int:
        """Instructions of the process `pid` started as `name`, from the file it wrote at exit."""
        path = self.out / f"{name}.{pid}"
        try:
            text = path.read_text(errors="replace")
        except OSError as e:
            raise bc.BenchError(f"{name} (pid {pid}) left no callgrind count ({path}): {e}; "
                                f"did it exit cleanly on SIGTERM?") from None
        m = re.search(r"^summary:\s*(\d+)", text, re.M) or re.search(r"^totals:\s*(\d+)",
                                                                        text, re.M)
        if not m:
            raise bc.BenchError(f"{path}: no summary line")
        return int(m.group(1))

    def keep(self, name: str, pid: int, dest: Path) -> None:
        """Copies the callgrind file of the process `pid` started as `name` to `dest`."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.out / f"{name}.{pid}", dest)


def self_costs(path: Path) -> dict[str, int]:
    """Instructions of each function's own code (callees excluded) in a callgrind file
    written with `--dump-instr=no --dump-line=no`: cost lines follow `fn=` lines; the cost
    line after a `calls=` line is the call's inclusive cost, which is not the caller's own."""
    names: dict[str, str] = {}
    costs: dict[str, int] = {}
    fn = ""
    after_call = False

    def name(spec: str) -> str:
        # Compressed names: "(12) name" defines id 12, "(12)" refers to it.
        m = re.match(r"\((\d+)\)(?:\s+(.*))?$", spec)
        if not m:
            return spec
        if m.group(2) is not None:
            names[m.group(1)] = m.group(2)
        return names.get(m.group(1), spec)

    with path.open(errors="replace") as f:
        for line in f:
            if line.startswith("fn="):
                fn = name(line[3:].strip())
            elif line.startswith("cfn="):
                name(line[4:].strip())
            elif line.startswith("calls="):
                after_call = True
            elif line[:1].isdigit() or line[:1] in "+-*":
                parts = line.split()
                if len(parts) >= 2 and not after_call:
                    costs[fn] = costs.get(fn, 0) + int(parts[1])
                after_call = False
    return costs


def top_functions(warmup: Path, measured: Path, calls: int, n: int) -> list[tuple[str, float]]:
    """The `n` functions with the most own instructions per call: measured minus warm-up."""
    a, b = self_costs(measured), self_costs(warmup)
    per_call = {f: (a.get(f, 0) - b.get(f, 0)) / calls for f in a.keys() | b.keys()}
    return sorted(per_call.items(), key=lambda kv: -kv[1])[:n]


def slug(label: str) -> str:
    """A file name part from a row label such as `lb (target/dist)`."""
    return re.sub(r"[^A-Za-z0-9]+", "_", label).strip("_")


def stop_gracefully(timeout: float = 90) -> None:
    """SIGTERM to everything started, then waits: under valgrind a clean exit takes a while,
    and only a clean exit writes the count."""
    for _name, proc in reversed(bc.STARTED):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for name, proc in reversed(bc.STARTED):
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            bc.log(f"{name} (pid {proc.pid}) did not exit {timeout:.0f} s after SIGTERM")
    bc.stop_all()


def measure(label: str, start, counted: dict[str, str], body: Path,
            args: argparse.Namespace) -> dict[str, float]:
    """Instructions per call of each counted process: two runs, each started by `start()`
    (which returns the bench and the target), with the warm-up calls in both and the
    measured calls in the second only; their difference over the measured calls.

    `counted` maps a process's name in the report to its name in `bench.pids` (which is also
    its wrapper's name: lb-agent, pure-runner or nginx).
    """
    totals = []
    files: list[dict[str, Path]] = []
    for calls in (0, args.calls):
        bench, target = start()
        try:
            if args.warmup_calls:
                bc.run_oha(bench.oha, target, 1, body, count=args.warmup_calls)
            if calls:
                bc.log(f"{label}: {calls} calls")
                raw = bc.run_oha(bench.oha, target, 1, body, count=calls)
                result = bc.summarize(raw, target, 1, {})
                if result.failed or result.ok != calls:
                    raise bc.BenchError(f"{label}: {result.ok} of {calls} calls answered 2xx "
                                        f"({result.failed} failed: {result.error_kinds})")
            pids = {shown: bench.pids[name] for shown, name in counted.items()}
        finally:
            stop_gracefully()
            shutil.rmtree(bench.tmp, ignore_errors=True)
        totals.append({shown: args.cg.total(counted[shown], pid) for shown, pid in pids.items()})
        files.append({shown: args.cg.out / f"{counted[shown]}.{pid}" for shown, pid in pids.items()})
        if args.keep_profiles:
            run = "measured" if calls else "warmup"
            for shown, pid in pids.items():
                args.cg.keep(counted[shown], pid,
                             args.keep_profiles / f"{slug(label)}-{shown}-{run}.out")
    if args.top:
        for shown in counted:
            args.tops.append((label, shown, top_functions(files[0][shown], files[1][shown],
                                                          args.calls, args.top)))
    return {shown: (totals[1][shown] - totals[0][shown]) / args.calls for shown in counted}


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    command = shlex.join([Path(sys.executable).name, sys.argv[0], *argv])
    valgrind = find_valgrind()
    vg_version = bc.run_quiet([valgrind, "--version"]).stdout.strip()
    for d in args.bin_dir:
        for b in ("lb-agent", "pure-runner", "fn-certs", "fn-echo", "fn-hello"):
            if not (d / b).is_file():
                raise bc.BenchError(f"{d / b} missing: run cargo build --profile dist "
                                    f"--workspace --bins")
    oha = bc.Oha.detect(bc.find_oha())
    nginx = None if args.no_nginx else bc.find_nginx()
    tmp = Path(tempfile.mkdtemp(prefix="fn-instr-", dir="/tmp"))
    os.chmod(tmp, 0o755)
    args.cg = Callgrind(valgrind, tmp / "callgrind")
    args.tops = []
    body = tmp / "body.bin"
    body.write_bytes(random.Random(0xF17).randbytes(args.body_size))
    rows: list[tuple[str, str, float]] = []
    started = time.monotonic()

    def bench_for(bin_dir: Path, i: int, with_nginx: bool, two_hop: bool = False) -> bc.Bench:
        # A bin dir whose lb-agent and pure-runner (and nginx) run under callgrind.
        wrapped = tmp / f"bin-{i}"
        if not wrapped.exists():
            wrapped.mkdir()
            for b in ("fn-certs", "fn-echo", "fn-hello"):
                (wrapped / b).symlink_to((bin_dir / b).resolve())
            for b in ("lb-agent", "pure-runner"):
                args.cg.wrapper(wrapped, b, (bin_dir / b).resolve())
            if nginx:
                args.cg.wrapper(wrapped, "nginx", Path(nginx))
        bench_args = bc.parse_args([
            "--bin-dir", str(wrapped), "--worker-threads", str(args.worker_threads),
            # With master_process off, more than one (ignored) worker left nginx under
            # valgrind deaf to the first connections.
            "--nginx-workers", "1",
            *(["--nginx-two-hop"] if two_hop else []),
            *(["--placer", args.placer] if args.placer else [])])
        bench = bc.Bench(bench_args, oha, str(wrapped / "nginx") if with_nginx else "", None)
        # One nginx process, like one lb-agent: the figure is per call either way.
        bench.nginx_master = "off"
        bench.slow = 6
        bench.make_certs()
        return bench

    def nginx_run(path: str):
        def start():
            bench = bench_for(args.bin_dir[0], 0, True, two_hop=path == "nginx2")
            socks = {"echo": bench.start_function("echo", "fn-echo"),
                     "hello": bench.start_function("hello", "fn-hello")}
            bench.start_nginx(socks["echo"], socks["hello"])
            return bench, bench.targets("echo", socks)[path]
        return start

    def lb_run(bin_dir: Path, i: int):
        def start():
            bench = bench_for(bin_dir, i, False)
            bench.start_lb()
            return bench, bc.Target("lb", f"http://127.0.0.1:{bench.lb_port}/r/bench/echo")
        return start

    try:
        if nginx:
            for path in ("nginx", "nginx2"):
                per = measure(path, nginx_run(path), {"nginx": "nginx"}, body, args)
                rows.append((path, "nginx", per["nginx"]))
        for i, bin_dir in enumerate(args.bin_dir):
            per = measure(f"lb ({bin_dir})", lb_run(bin_dir, i),
                          {"lb-agent": "lb-agent", "pure-runner": "pure-runner"}, body, args)
            label = f"lb ({bin_dir})"
            rows.append((label, "lb-agent", per["lb-agent"]))
            rows.append((label, "pure-runner", per["pure-runner"]))
            rows.append((label, "both", per["lb-agent"] + per["pure-runner"]))
    finally:
        for p in list(bc.CURRENT):
            if p.poll() is None:
                p.kill()
        bc.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)

    ref = {path: v for path, _, v in rows if path in ("nginx", "nginx2")}
    out = ["== bench-instructions: user-space instructions per call (callgrind) ==",
           f"command   {command}",
           f"tools     {vg_version}; oha {oha.version}",
           f"method    POSTs of {args.body_size} random bytes to fn-echo at c=1; per path two "
           f"runs, {args.warmup_calls} calls in both and {args.calls} more in the second; "
           f"the difference over {args.calls}; FN_WORKER_THREADS={args.worker_threads}; "
           f"took {time.monotonic() - started:.0f} s",
           ""]
    headers = ["path", "process", "instructions/call", *(f"x {k}" for k in ref)]
    table_rows = [[path, proc, f"{v:,.0f}", *(f"{v / r:.2f}" for r in ref.values())]
                  for path, proc, v in rows]
    out.append(bc.table(headers, table_rows, right={2, 3, 4}))
    out.append("  (user space only: the kernel's share of each call is not counted; the "
               "functions run natively and are not counted)")
    per_process = {(path, proc): v for path, proc, v in rows}
    for label, process, top in args.tops:
        total = per_process.get((label, process))
        out.append("")
        out.append(f"{label}, {process}: the {len(top)} functions with the most instructions "
                   f"of their own per call")
        out.append(bc.table(["instructions/call", "share", "function"],
                            [[f"{v:,.0f}", f"{100 * v / total:.1f}%" if total else "-", f[:110]]
                             for f, v in top], right={0, 1}))
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except bc.BenchError as e:
        bc.log(f"error: {e}")
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
