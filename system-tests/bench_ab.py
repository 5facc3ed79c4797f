#!/usr/bin/env python3
"""`make bench-ab`: two or more builds of the lb path, side by side in one run.

Python 3.11 standard library only; oha and nginx as for bench_compare.py, whose setups this
script reuses. Not a test: it measures and prints, and is not part of `make test`.

Why: this VM's CPU time per call moves by ±10% between runs minutes apart, and by a factor
of two between quiet and busy hours, so a change worth a few percent cannot be seen by
running bench_compare.py on the build before and the build after. Here every build runs
its own lb-agent and pure-runner at the same time, and their rounds alternate within one
run, next to an nginx round each time as the yardstick:

  round 1: nginx, A, B      round 2: nginx, B, A      round 3: nginx, A, B ...

Each build is compared with the first in the same round (B/A of RPS, and of both daemons'
CPU per call), so what the machine does between rounds falls on both sides. The spread of
those ratios over the rounds is printed with them: a difference inside it is not one. Give
the same directory twice to see this machine's spread for a build against itself.

The direct path and nginx use the first build's fn-echo and fn-hello; each lb stack runs
its own build's functions.

`--together` adds a path to every round of the echo rows: all the stacks at once, each
taking an equal share of the concurrency from a load generator of its own, their RPS summed.
Given one build several times, it measures what one lb-agent and one pure-runner leave of
the machine unused: N independent single-threaded pairs against one pair at the same total
concurrency (a diagnostic of the design, not a deployment shape).

`--shards 1,2` sets FN_SHARDS per stack, so the same build given twice measures what shards
change, with no wrapper script around the binaries.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import signal
import statistics
import string
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_compare as bc  # noqa: E402

LABELS = "ABCDEFGH"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench_ab.py",
        description="Builds of lb-agent and pure-runner side by side in one run, rounds "
                    "alternating, each next to nginx.")
    p.add_argument("--bin-dir", type=Path, action="append", required=True,
                   help="a build's directory (lb-agent, pure-runner, fn-certs, fn-echo, "
                        "fn-hello); give it two to eight times, the first is the baseline")
    p.add_argument("--concurrency", type=bc.parse_concurrency, default=[1, 64],
                   help="comma-separated concurrencies of the echo rows (default 1,64)")
    p.add_argument("--rounds", type=int, default=6,
                   help="measured rounds per concurrency; each build runs once per round "
                        "(default 6)")
    p.add_argument("--duration", type=bc.parse_duration, default=4.0,
                   help="length of one measured round of one path (default 4s)")
    p.add_argument("--warmup", type=bc.parse_duration, default=1.0,
                   help="warm-up per path and concurrency, not counted (default 1s)")
    p.add_argument("--body-size", type=int, default=1024,
                   help="request body of the echo rows in bytes (default 1024)")
    p.add_argument("--big-mib", type=float, default=0.0,
                   help="also a row of this many MiB through fn-hello at c=8, as "
                        "bench_compare.py's big row (default 0: none)")
    p.add_argument("--worker-threads", type=int, default=1,
                   help="FN_WORKER_THREADS of every lb-agent and pure-runner (default 1, as "
                        "the compose stack sets it)")
    p.add_argument("--shards", type=bc.parse_concurrency, default=[1],
                   help="FN_SHARDS of the stacks' lb-agent and pure-runner, comma-separated in "
                        "the order of --bin-dir, or one value for all (default 1); the same "
                        "build twice with --shards 1,2 measures what shards change")
    p.add_argument("--fn-concurrency", type=int, default=1,
                   help="the catalog's `concurrency` behind every lb stack (default 1)")
    p.add_argument("--placer", choices=["warm", "ch", "naive"], default=None,
                   help="FN_PLACER of every lb-agent (default: the lb-agent's default)")
    p.add_argument("--together", action="store_true",
                   help="also run every stack at once in each round of the echo rows whose "
                        "concurrency splits evenly over them, each at an equal share, RPS "
                        "summed (see above)")
    p.add_argument("--json-out", type=Path, default=None, help="also write the figures as JSON")
    p.add_argument("--keep-tmp", action="store_true",
                   help="keep the temp directories (logs, configs)")
    args = p.parse_args(argv)
    if not 2 <= len(args.bin_dir) <= len(LABELS):
        p.error(f"give --bin-dir two to {len(LABELS)} times (the same one twice measures "
                "the spread of a build against itself)")
    if args.rounds < 2:
        p.error("--rounds must be >= 2 (the order of the builds alternates between rounds)")
    if args.body_size < 0 or args.big_mib < 0:
        p.error("--body-size and --big-mib must be >= 0")
    if args.worker_threads < 1:
        p.error("--worker-threads must be >= 1")
    if len(args.shards) == 1:
        args.shards = args.shards * len(args.bin_dir)
    if len(args.shards) != len(args.bin_dir):
        p.error(f"--shards gives {len(args.shards)} values for {len(args.bin_dir)} builds: "
                "give one per --bin-dir, or one for all")
    if max(args.shards) > 256:
        p.error("--shards values must be between 1 and 256")
    if max(args.shards) > 1 and args.worker_threads != 1:
        p.error("--shards above 1 needs --worker-threads 1 (each shard is one thread)")
    if args.together and not any(splits(c, len(args.bin_dir)) for c in args.concurrency):
        p.error(f"--together splits a concurrency evenly over the {len(args.bin_dir)} stacks: "
                "give at least one concurrency that is a multiple of that")
    return args


def splits(concurrency: int, stacks: int) -> bool:
    """Whether --together can give each of `stacks` an equal share of `concurrency`."""
    return concurrency % stacks == 0


def order_of(builds: list[str], round_index: int) -> list[str]:
    """The builds' order in a round: as given in even rounds, reversed in odd ones, so that
    no build always runs first after nginx (A B, B A, A B, ...)."""
    return list(builds) if round_index % 2 == 0 else list(reversed(builds))


def ratio_stats(values: list[float]) -> tuple[float, float, float] | None:
    """Median, lowest and highest of per-round ratios; None without any."""
    if not values:
        return None
    return statistics.median(values), min(values), max(values)


def both_cpu(r: bc.RoundResult) -> float | None:
    """Both daemons' CPU µs per call in a round of an lb stack."""
    a, b = r.cpu_us_per_call.get("lb-agent"), r.cpu_us_per_call.get("pure-runner")
    return None if a is None or b is None else a + b


def paired(rounds_x: list[bc.RoundResult], rounds_base: list[bc.RoundResult], get) -> list[float]:
    """`get(x) / get(base)` for each round where both are known and the base is not 0."""
    out = []
    for x, base in zip(rounds_x, rounds_base):
        a, b = get(x), get(base)
        if a is not None and b:
            out.append(a / b)
    return out


def fmt_stats(s: tuple[float, float, float] | None) -> str:
    return "-" if s is None else f"{s[0]:.3f} [{s[1]:.3f}–{s[2]:.3f}]"


class Stack:
    """One build's lb-agent and pure-runner (and, for the first, direct functions and nginx)."""

    def __init__(self, label: str, bin_dir: Path, shards: int, args: argparse.Namespace,
                 oha: bc.Oha, nginx: str):
        self.label = label
        self.shards = shards
        bench_args = bc.parse_args([
            "--bin-dir", str(bin_dir), "--no-strace", "--big-mib", "0",
            "--concurrency", ",".join(str(c) for c in args.concurrency),
            "--worker-threads", str(args.worker_threads), "--shards", str(shards),
            "--fn-concurrency", str(args.fn_concurrency),
            "--duration", f"{args.duration}s", "--warmup", f"{args.warmup}s",
            *(["--placer", args.placer] if args.placer else []),
        ])
        self.bench = bc.Bench(bench_args, oha, nginx, None)

    def lb_target(self, fn: str) -> bc.Target:
        return bc.Target("lb", f"http://127.0.0.1:{self.bench.lb_port}/r/bench/{fn}")


def together_round(stacks: list[Stack], fn: str, concurrency: int, body: Path,
                   duration: float) -> bc.RoundResult:
    """Every stack at once, each at its share of `concurrency` from its own oha; one result
    with the RPS and calls summed and CPU per call weighted by each stack's calls (no
    latency percentiles: separate runs' cannot be merged)."""
    share = concurrency // len(stacks)
    results: list[bc.RoundResult | None] = [None] * len(stacks)
    failures: list[BaseException] = []

    def run(i: int, stack: Stack) -> None:
        try:
            results[i] = stack.bench.measured_round(stack.lb_target(fn), fn, share, body,
                                                    duration)
        except BaseException as e:  # noqa: BLE001 -- raised again in the caller's thread
            failures.append(e)

    threads = [threading.Thread(target=run, args=(i, s)) for i, s in enumerate(stacks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise failures[0]
    done = [r for r in results if r is not None]
    ok = sum(r.ok for r in done)

    def per_call(key: str) -> float | None:
        parts = [(r.cpu_us_per_call.get(key), r.ok) for r in done]
        if not ok or any(v is None for v, _ in parts):
            return None
        return sum(v * n for v, n in parts) / ok

    kinds: dict = {}
    for r in done:
        for k, v in r.error_kinds.items():
            kinds[k] = kinds.get(k, 0) + v
    idle = [r.idle_share for r in done if r.idle_share is not None]
    return bc.RoundResult(
        path="together", concurrency=concurrency, ok=ok, non2xx=sum(r.non2xx for r in done),
        errors=sum(r.errors for r in done), error_kinds=kinds,
        seconds=max(r.seconds for r in done), rps=sum(r.rps for r in done), p50_ms=None,
        p99_ms=None, resp_bytes=done[0].resp_bytes,
        cpu_us_per_call={k: per_call(k) for k in done[0].cpu_us_per_call},
        idle_share=statistics.mean(idle) if idle else None)


def run_rows(stacks: list[Stack], socks: dict, fn: str, concurrency: int, body: Path,
             args: argparse.Namespace, label: str,
             together: bool = False) -> dict[str, list[bc.RoundResult]]:
    """Warm-up, then `args.rounds` rounds of nginx and every build (and all builds at once,
    when `together`); results by path/label."""
    base = stacks[0].bench
    nginx = base.targets(fn, socks)["nginx"]
    by_label = {s.label: s for s in stacks}
    bc.log(f"{label} c={concurrency}: warm-up {args.warmup:g}s per path")
    for name, target in [("nginx", nginx), *((s.label, s.lb_target(fn)) for s in stacks)]:
        w = bc.summarize(bc.run_oha(base.oha, target, concurrency, body, duration=args.warmup),
                         target, concurrency, {})
        if w.failed:
            bc.log(f"  warm-up {name}: {w.failed} failed calls {w.error_kinds}")
    results: dict[str, list[bc.RoundResult]] = {"nginx": [], **{s.label: [] for s in stacks}}
    if together:
        results["together"] = []
    for r in range(args.rounds):
        order = order_of([s.label for s in stacks], r)
        bc.log(f"{label} c={concurrency}: round {r + 1}/{args.rounds} (nginx, {', '.join(order)})")
        results["nginx"].append(base.measured_round(nginx, fn, concurrency, body, args.duration))
        for name in order:
            stack = by_label[name]
            bc.log(f"  ({name} = {stack.bench.bin})")
            results[name].append(stack.bench.measured_round(stack.lb_target(fn), fn, concurrency,
                                                            body, args.duration))
        if together:
            bc.log(f"  (all {len(stacks)} stacks at once, c={concurrency // len(stacks)} each)")
            results["together"].append(together_round(stacks, fn, concurrency, body,
                                                      args.duration))
    return results


def report_rows(p, title: str, results: dict[str, list[bc.RoundResult]], labels: list[str],
                fn: str, big_bytes: int | None) -> dict:
    """Prints one row's tables; returns its figures for --json-out."""
    nginx = results["nginx"]
    p(title)
    rows = []
    for i in range(len(nginx)):
        rows.append([str(i + 1), bc.fmt_num(nginx[i].rps, 1),
                     *(bc.fmt_num(results[k][i].rps, 1) for k in labels)])
    p(bc.table(["round", "nginx RPS", *(f"{k} RPS" for k in labels)], rows,
               right=set(range(len(labels) + 2))))
    p("")
    figures = {}
    rows = []
    for k in labels:
        rs = results[k]
        lb_nginx = ratio_stats(paired(rs, nginx, lambda r: r.rps))
        cpu_x = ratio_stats(paired(rs, nginx, lambda r: (
            both_cpu(r) if r.path == "lb" else r.cpu_us_per_call.get("nginx"))))
        med = lambda get: bc.median_of(rs, get)  # noqa: E731
        failed = sum(r.failed for r in rs)
        row = [k, bc.fmt_num(med(lambda r: r.rps), 1), fmt_stats(lb_nginx),
               bc.fmt_num(med(lambda r: r.cpu_us_per_call.get("lb-agent")), 1),
               bc.fmt_num(med(lambda r: r.cpu_us_per_call.get("pure-runner")), 1),
               bc.fmt_num(med(lambda r: r.cpu_us_per_call.get(f"fn-{fn}")), 1),
               fmt_stats(cpu_x), str(failed)]
        if big_bytes:
            row.insert(2, bc.fmt_num(med(lambda r: (
                (big_bytes + (r.resp_bytes or 0)) * r.ok / r.seconds / 2**20)
                if r.seconds else None), 1))
        rows.append(row)
        figures[k] = {"lb_over_nginx": lb_nginx, "cpu_both_over_nginx": cpu_x, "failed": failed}
    head = ["build", "median RPS", "lb/nginx median [min–max]", "lb-agent µs/call",
            "pure-runner µs/call", f"fn-{fn} µs/call", "CPU both/nginx median [min–max]",
            "failed"]
    if big_bytes:
        head.insert(2, "median MiB/s in+out")
    p(bc.table(head, rows, right=set(range(1, len(head)))))
    p(f"  (medians over the rounds; lb/nginx and CPU both/nginx are each round's ratio to that "
      f"round's nginx; nginx's CPU per call median {bc.fmt_num(bc.median_of(nginx, lambda r: r.cpu_us_per_call.get('nginx')), 1)} µs)")
    p("")
    base = labels[0]
    rows = []
    for k in labels[1:]:
        rps = ratio_stats(paired(results[k], results[base], lambda r: r.rps))
        cpu = ratio_stats(paired(results[k], results[base], both_cpu))
        faster = sum(1 for x in paired(results[k], results[base], lambda r: r.rps) if x > 1)
        rows.append([f"{k}/{base}", fmt_stats(rps), f"{faster} of {len(results[k])}",
                     fmt_stats(cpu)])
        figures[f"{k}/{base}"] = {"rps": rps, "cpu_both": cpu, "rounds_faster": faster}
    p(bc.table(["builds", "RPS ratio median [min–max]", "rounds with more RPS",
                "CPU per call (both daemons) ratio median [min–max]"], rows, right={2}))
    p("  (each round's ratio of the two builds; below 1 for CPU is cheaper, above 1 for RPS is "
      "faster; a median inside the other builds' spread, or inside a build's spread against "
      "itself, is not a difference)")
    p("")
    if "together" in results:
        figures["together"] = report_together(p, results, labels)
    return figures


def report_together(p, results: dict[str, list[bc.RoundResult]], labels: list[str]) -> dict:
    """The --together rows: all stacks at once against the first alone, round by round."""
    together, base, nginx = results["together"], results[labels[0]], results["nginx"]
    n = len(labels)
    rows = [[str(i + 1), bc.fmt_num(t.rps, 1), bc.fmt_num(a.rps, 1),
             bc.fmt_num(t.rps / a.rps if a.rps else None, 3),
             bc.fmt_num(100 * t.idle_share if t.idle_share is not None else None, 1),
             bc.fmt_num(100 * a.idle_share if a.idle_share is not None else None, 1),
             str(t.failed)]
            for i, (t, a) in enumerate(zip(together, base))]
    p(f"All {n} stacks at once (each at 1/{n} of the concurrency) against {labels[0]} alone")
    p(bc.table(["round", "together RPS", f"{labels[0]} RPS", f"together/{labels[0]}",
                "idle % together", f"idle % {labels[0]}", "failed"], rows,
               right=set(range(7))))
    rps = ratio_stats(paired(together, base, lambda r: r.rps))
    cpu = ratio_stats(paired(together, base, both_cpu))
    lb_nginx = ratio_stats(paired(together, nginx, lambda r: r.rps))
    more = sum(1 for x in paired(together, base, lambda r: r.rps) if x > 1)
    p(f"  together/{labels[0]} RPS {fmt_stats(rps)}, {more} of {len(together)} rounds more; "
      f"together/nginx {fmt_stats(lb_nginx)}; both daemons' CPU per call together/"
      f"{labels[0]} {fmt_stats(cpu)}")
    p("")
    return {"rps": rps, "cpu_both": cpu, "over_nginx": lb_nginx, "rounds_more": more}


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    command = shlex.join([Path(sys.executable).name, sys.argv[0], *argv])
    for d in args.bin_dir:
        for b in ("lb-agent", "pure-runner", "fn-certs", "fn-echo", "fn-hello"):
            if not (d / b).is_file():
                raise bc.BenchError(f"{d / b} missing: run cargo build --profile dist "
                                    "--workspace --bins, and copy target/dist's binaries to a "
                                    "directory per build")
    facts = bc.machine_facts()
    bc.log(f"start: {facts['nproc']} CPUs, load average {facts['loadavg_start']}")
    oha = bc.Oha.detect(bc.find_oha())
    nginx = bc.find_nginx()
    labels = list(LABELS[:len(args.bin_dir)])
    stacks = [Stack(k, d, n, args, oha, nginx)
              for k, d, n in zip(labels, args.bin_dir, args.shards)]
    t_start = time.monotonic()
    rss: dict[str, dict[str, int | None]] = {}
    try:
        rng = random.Random(0xAB)
        tmp = stacks[0].bench.tmp
        body = tmp / "body.bin"
        body.write_bytes(rng.randbytes(args.body_size))
        big = tmp / "big.txt"
        if args.big_mib:
            alphabet = (string.ascii_letters + string.digits).encode()
            big.write_bytes(bytes(rng.choices(alphabet, k=int(args.big_mib * 2**20))))

        base = stacks[0].bench
        bc.log("starting fn-echo and fn-hello (direct) and nginx from A; an lb stack per build")
        for s in stacks:
            s.bench.make_certs()
        socks = {"echo": base.start_function("echo", "fn-echo"),
                 "hello": base.start_function("hello", "fn-hello")}
        base.start_nginx(socks["echo"], socks["hello"])
        for s in stacks:
            # Every stack's CPU figures name the direct functions (bench_compare's groups).
            s.bench.pids.update({k: v for k, v in base.pids.items() if k.startswith("direct-")})
            bc.log(f"lb stack {s.label}: {s.bench.bin}")
            s.bench.start_lb()

        echo = {c: run_rows(stacks, socks, "echo", c, body, args, "echo",
                            args.together and splits(c, len(stacks)))
                for c in args.concurrency}
        big_rows = (run_rows(stacks, socks, "hello", bc.BIG_CONCURRENCY, big, args,
                             f"big {args.big_mib:g} MiB via fn-hello") if args.big_mib else None)
        for s in stacks:
            rss[s.label] = {d: bc.vm_hwm_kib(s.bench.pids[d]) for d in ("lb-agent", "pure-runner")}
        load_end = os.getloadavg()
    finally:
        for proc in list(bc.CURRENT):
            if proc.poll() is None:
                proc.kill()
        bc.stop_all()
        for s in stacks:
            if args.keep_tmp:
                bc.log(f"kept {s.bench.tmp}")
            else:
                shutil.rmtree(s.bench.tmp, ignore_errors=True)
    elapsed = time.monotonic() - t_start

    out: list[str] = []
    p = out.append
    p("== bench-ab: builds of lb-agent -> pure-runner side by side, next to nginx ==")
    out.extend(bc.run_facts(command, facts, load_end, elapsed))
    p(f"tools        {oha.version}; nginx from {nginx}")
    for s in stacks:
        p(f"build {s.label}      {s.bench.bin} ({bc.bin_facts(s.bench.bin)}), "
          f"FN_SHARDS={s.shards}")
    p(f"method       echo rows: POST of {args.body_size} random bytes to fn-echo; per "
      f"concurrency {args.warmup:g} s warm-up per path, then {args.rounds} rounds of "
      f"{args.duration:g} s per path: nginx, then the builds, their order reversed every other "
      f"round. FN_WORKER_THREADS={args.worker_threads}, catalog concurrency "
      f"{args.fn_concurrency}, mutual TLS, placer {args.placer or 'default'}; every lb stack "
      "has its own runner and function instances." + (
          f" --together: every round of an echo row whose concurrency splits evenly ends "
          f"with all {len(stacks)} stacks at once, each at an equal share of it."
          if args.together else ""))
    p("")
    figures = {}
    for c, results in echo.items():
        figures[f"echo c={c}"] = report_rows(p, f"Echo c={c}", results, labels, "echo", None)
    if big_rows:
        figures[f"big c={bc.BIG_CONCURRENCY}"] = report_rows(
            p, f"Big row: {args.big_mib:g} MiB to fn-hello at c={bc.BIG_CONCURRENCY}", big_rows,
            labels, "hello", int(args.big_mib * 2**20))
    p("Peak RSS (VmHWM at the end): " + "; ".join(
        f"{k} lb-agent {bc.fmt_num((v['lb-agent'] or 0) / 1024, 1)} MiB, pure-runner "
        f"{bc.fmt_num((v['pure-runner'] or 0) / 1024, 1)} MiB" for k, v in rss.items()))
    report = "\n".join(out)
    print(report, flush=True)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps({
            "command": command, "machine": facts, "elapsed_s": elapsed,
            "builds": {s.label: str(s.bench.bin) for s in stacks},
            "shards": {s.label: s.shards for s in stacks},
            "figures": figures, "peak_rss_kib": rss,
            "rounds": {f"echo c={c}": {k: [r.__dict__ for r in v] for k, v in res.items()}
                       for c, res in echo.items()},
            "report": report}, indent=2, default=str))
        bc.log(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, bc.on_sigterm)
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        bc.log("interrupted; everything started was stopped")
        sys.exit(130)
    except bc.BenchError as e:
        bc.log(f"error: {e}")
        sys.exit(1)
