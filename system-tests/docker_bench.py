#!/usr/bin/env python3
"""`make bench-docker`: the docker driver beside the process driver, on one runner.

Python 3.11 standard library only. Not a test: it measures and prints. One lb-agent and one
pure-runner (release builds, mutual TLS) serve the same function, `fn-echo`, twice per
slot: as a command (process driver) and as a `FROM scratch` image of the same static binary
(docker driver), so that the only difference between the two is the driver.

- cold start: --cold N functions of each kind, each called once (its first call starts its
  first instance), alternating process and docker; p50 and p99 of those first calls;
- hot call: after a warm-up, --hot calls in a row (one client, keep-alive) to one warm
  instance of each kind, alternating in blocks; p50 and p99 of each, and the difference,
  which is what a container costs a hot call over a child process.

Everything it starts is stopped and the image and containers it made are removed on exit.
"""

from __future__ import annotations

import argparse
import http.client
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_compare as bc  # noqa: E402  (shared process helpers)

IMAGE = "fn-dataplane-bench/echo:latest"
RUNNER_ID = "fn-bench-docker"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bin-dir", type=Path, required=True,
                   help="pure-runner, lb-agent, fn-certs and a statically linked fn-echo")
    p.add_argument("--cold", type=int, default=30, help="cold starts measured per driver")
    p.add_argument("--hot", type=int, default=2000, help="hot calls measured per driver")
    p.add_argument("--body-size", type=int, default=1024)
    return p.parse_args(argv)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def timed_call(conn: http.client.HTTPConnection, path: str, body: bytes) -> float:
    start = time.perf_counter()
    conn.request("POST", path, body=body, headers={"Content-Type": "application/octet-stream"})
    resp = conn.getresponse()
    data = resp.read()
    took = time.perf_counter() - start
    if resp.status != 200 or data != body:
        raise bc.BenchError(f"{path} answered {resp.status} {data[:200]!r}")
    return took * 1000.0


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="fnbd"))
    logs = tmp / "logs"
    logs.mkdir()
    sockets = None
    try:
        context = tmp / "image"
        context.mkdir()
        shutil.copy2(args.bin_dir / "fn-echo", context / "function")
        (context / "Dockerfile").write_text(
            "FROM scratch\nLABEL fn.dataplane.test-image=1\nCOPY function /function\n"
            "ENTRYPOINT [\"/function\"]\n")
        bc.run_quiet(["docker", "build", "--quiet", "--tag", IMAGE, str(context)]).check_returncode()

        certs = tmp / "certs"
        bc.run_quiet([str(args.bin_dir / "fn-certs"), "--out", str(certs)]).check_returncode()
        cert_env = {
            "FN_NODE_CERT_AUTHORITY": str(certs / "ca.pem"),
            "FN_NODE_CERT": str(certs / "node.pem"),
            "FN_NODE_CERT_KEY": str(certs / "node-key.pem"),
        }
        functions = tmp / "functions"
        functions.mkdir(mode=0o755)
        shutil.copy2(args.bin_dir / "fn-echo", functions / "fn-echo")
        tmp.chmod(0o755)
        sockets = Path(tempfile.mkdtemp(prefix="fnbs", dir="/tmp"))
        sockets.chmod(0o711)
        grpc = bc.free_port()
        runner = bc.start("pure-runner", [str(args.bin_dir / "pure-runner")], bc.clean_env({
            **cert_env,
            "FN_GRPC_PORT": str(grpc),
            "FN_LISTEN_ADDR": "127.0.0.1",
            "FN_FUNCTIONS_DIR": str(functions),
            "FN_SOCKET_DIR": str(sockets),
            "FN_DOCKER_IOFS_DIR": str(sockets / "iofs"),
            "FN_RUNNER_ID": RUNNER_ID,
            "FN_MAX_MEMORY_MB": "16384",
            "FN_LOG_LEVEL": "warn",
            "FN_SHUTDOWN_TIMEOUT": "10s",
        }), logs / "pure-runner.log")

        entries = []
        for kind, how in (("p", 'command = ["fn-echo"]'), ("d", f'image = "{IMAGE}"')):
            for i in range(args.cold + 1):
                entries.append(f"""
[[functions]]
app = "bench"
name = "{kind}{i}"
{how}
memory_mb = 32
timeout = "60s"
idle_timeout = "30m"
""")
        catalog = tmp / "functions.toml"
        catalog.write_text("".join(entries))
        port = bc.free_port()
        lb = bc.start("lb-agent", [str(args.bin_dir / "lb-agent")], bc.clean_env({
            **cert_env,
            "FN_PORT": str(port),
            "FN_LISTEN_ADDR": "127.0.0.1",
            "FN_RUNNER_ADDRESSES": f"127.0.0.1:{grpc}",
            "FN_FUNCTIONS_FILE": str(catalog),
            "FN_LOG_LEVEL": "warn",
            "FN_DRAIN_DELAY": "0s",
        }), logs / "lb-agent.log")

        def health():
            status, _, _ = bc.http_call(http.client.HTTPConnection("127.0.0.1", port, timeout=2),
                                        "GET", "/health")
            return status == 200

        bc.wait_for("lb-agent /health", health, 30, lb, logs / "lb-agent.log")
        if runner.poll() is not None:
            raise bc.BenchError(f"pure-runner exited:\n{bc.tail(logs / 'pure-runner.log')}")

        body = bytes(i % 251 for i in range(args.body_size))
        cold: dict[str, list[float]] = {"p": [], "d": []}
        for i in range(1, args.cold + 1):
            for kind in ("p", "d"):
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                cold[kind].append(timed_call(conn, f"/r/bench/{kind}{i}", body))
                conn.close()

        hot: dict[str, list[float]] = {"p": [], "d": []}
        conns = {k: http.client.HTTPConnection("127.0.0.1", port, timeout=60) for k in hot}
        for kind in hot:
            for _ in range(200):
                timed_call(conns[kind], f"/r/bench/{kind}0", body)
        block = 100
        for _ in range(max(1, args.hot // block)):
            for kind in hot:
                for _ in range(block):
                    hot[kind].append(timed_call(conns[kind], f"/r/bench/{kind}0", body))

        name = {"p": "process (fn-echo as a command)", "d": "docker (fn-echo FROM scratch)"}
        print(f"\ncold start: first call to a new instance, {args.cold} per driver, {args.body_size} B")
        for kind in ("p", "d"):
            print(f"  {name[kind]:34} p50 {pct(cold[kind], .5):8.2f} ms   p99 {pct(cold[kind], .99):8.2f} ms")
        print(f"\nhot call: {len(hot['p'])} per driver, one client, keep-alive")
        for kind in ("p", "d"):
            print(f"  {name[kind]:34} p50 {pct(hot[kind], .5):8.3f} ms   p99 {pct(hot[kind], .99):8.3f} ms"
                  f"   mean {statistics.fmean(hot[kind]):.3f} ms")
        print(f"  docker - process: p50 {pct(hot['d'], .5) - pct(hot['p'], .5):+.3f} ms, "
              f"mean {statistics.fmean(hot['d']) - statistics.fmean(hot['p']):+.3f} ms")
        return 0
    except (bc.BenchError, subprocess.CalledProcessError) as e:
        print(f"bench-docker: {e}", file=sys.stderr)
        return 1
    finally:
        bc.stop_all()
        ids = subprocess.run(["docker", "ps", "-aq", "--filter", f"label=fn.dataplane.runner={RUNNER_ID}"],
                             capture_output=True, text=True).stdout.split()
        if ids:
            subprocess.run(["docker", "rm", "-f", *ids], capture_output=True)
        subprocess.run(["docker", "image", "rm", "-f", IMAGE], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
        if sockets is not None:
            shutil.rmtree(sockets, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
