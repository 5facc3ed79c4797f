#!/usr/bin/env python3
"""The swarm deployment, end to end (`make test-swarm`, part of `make test` where an engine
answers; Python 3 stdlib only).

Deploys deploy/docker-stack.yml as a user would, on images `make images` built, on this
machine's engine as a single-node swarm, and drives it through the LBs' published port:

- no runner service before any call; the first call makes one (scale from zero) and answers;
- a burst that needs 3 runners gets 3 runner services, with no failed call;
- `docker service rm` of a runner service (a lost runner) is noticed: calls go on;
- a killed npm, restarted by Swarm, adopts the runner services instead of making more;
- a killed runner is restarted by Swarm under the same service (its place in the lists);
- without load the runner services drain and are removed;
- `docker stack rm` leaves no service or container (the npm removes its runners first);
- the npm and the LBs run with every capability dropped (the npm keeps DAC_READ_SEARCH);
- the certificate secrets are made as `make stack-up` makes them (deploy/stack-secrets.sh),
  labelled with their files' SHA-256: a renewed file is warned of, and a secret without the
  label is said to be one it cannot compare.

If the engine is not in a swarm, the test initialises one on 127.0.0.1 (its management port
too, 2377, not on every address) and leaves it at the end; a swarm that was there is left as it was. The certificate secrets are made here unless
they exist (then they are left), and removed if made here. Every wait is bounded; whatever
happens, the stack, its runner services and what the test made are removed.
"""

import hashlib
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compose_test as ct  # noqa: E402  (check, run, wait_until and the counters)

ROOT = Path(__file__).resolve().parent.parent
STACK_FILE = ROOT / "deploy" / "docker-stack.yml"
SECRETS_SCRIPT = ROOT / "deploy" / "stack-secrets.sh"
# Where `make images` put the static binaries: its IMAGE_PROFILE (dist unless told).
STATIC_BIN = (ROOT / "target" / f"{platform.machine()}-unknown-linux-gnu"
              / os.environ.get("IMAGE_PROFILE", "dist"))
STACK = f"fnsw{os.getpid()}{random.randrange(16**4):04x}"
NPM_ID = f"{STACK}_backend"
SECRETS = {
    "fn-dataplane-ca.pem": "ca.pem",
    "fn-dataplane-node.pem": "node.pem",
    "fn-dataplane-node-key.pem": "node-key.pem",
}
check, run, wait_until, Failed = ct.check, ct.run, ct.wait_until, ct.Failed

# Seconds each step took, printed at the end (the README quotes them).
TIMINGS = {}

CATALOG = """
[[functions]]
app = "demo"
name = "hello"
route = "/hello"
command = ["fn-hello"]
memory_mb = 64
timeout = "60s"

[[functions]]
app = "demo"
name = "sleep"
route = "/sleep"
command = ["fn-sleep"]
memory_mb = 128
timeout = "60s"
"""


def swarm_state():
    return run(["docker", "info", "--format", "{{.Swarm.LocalNodeState}}"]).strip()


def runner_services():
    out = run(["docker", "service", "ls", "--filter", f"label=fn.dataplane.npm={NPM_ID}",
               "--format", "{{.Name}}"])
    return sorted(out.split())


def networks():
    return run(["docker", "network", "ls", "--format", "{{.Name}}"], check_rc=False).split()


def service_logs(service):
    """A service's output; the daemons log to stderr."""
    done = subprocess.run(["docker", "service", "logs", service], capture_output=True,
                          text=True, timeout=30, stdin=subprocess.DEVNULL)
    return done.stdout + done.stderr


def stack_leftovers():
    found = run(["docker", "service", "ls", "-q", "--filter",
                 f"label=com.docker.stack.namespace={STACK}"]).split()
    found += run(["docker", "ps", "-aq", "--filter",
                  f"label=com.docker.stack.namespace={STACK}"]).split()
    found += run(["docker", "service", "ls", "-q", "--filter",
                  f"label=fn.dataplane.npm={NPM_ID}"]).split()
    found += run(["docker", "ps", "-aq", "--filter", f"label=fn.dataplane.npm={NPM_ID}"]).split()
    return found


class Lbs:
    def __init__(self, port):
        self.port = port

    def call(self, path, body=b"", timeout=60):
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=body,
                                         method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def healthy(self):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False


def burst(lbs, calls, path, body):
    results = []
    lock = threading.Lock()

    def one():
        status, _ = lbs.call(path, body)
        with lock:
            results.append(status)

    threads = [threading.Thread(target=one) for _ in range(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def make_secrets(tmp):
    """Creates the certificate secrets that do not exist, as `make stack-up` does; returns
    those it created and the directory of their files."""
    existing = set(run(["docker", "secret", "ls", "--format", "{{.Name}}"]).split())
    missing = [name for name in SECRETS if name not in existing]
    certs = Path(tmp) / "certs"
    if not missing:
        return [], certs
    fn_certs = STATIC_BIN / "fn-certs"
    if not fn_certs.is_file():
        raise Failed(f"{fn_certs} is missing: run `make images` first")
    run([str(fn_certs), "--out", str(certs), "--san", "fn-node"])
    run(["sh", str(SECRETS_SCRIPT), str(certs), *[f"{name}:{SECRETS[name]}" for name in missing]])
    return missing, certs


def secrets_script(certs, pairs):
    """deploy/stack-secrets.sh over `certs`; returns its stderr (its warnings)."""
    done = subprocess.run(["sh", str(SECRETS_SCRIPT), str(certs), *pairs], capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)
    check(done.returncode == 0, f"stack-secrets.sh exits 0: {done.returncode} {done.stderr}")
    return done.stderr


def secret_checks(certs, created):
    """The secrets stack-up makes carry their files' hash, and a renewed file is warned of.
    Only over secrets this run made (others' files are not here)."""
    if sorted(created) != sorted(SECRETS):
        print("  skip the secrets' checks: the certificate secrets were there before", flush=True)
        return
    pairs = [f"{name}:{file}" for name, file in SECRETS.items()]
    label = run(["docker", "secret", "inspect", "--format", '{{index .Spec.Labels "fn.sha256"}}',
                 "fn-dataplane-node.pem"]).strip()
    check(label == hashlib.sha256((certs / "node.pem").read_bytes()).hexdigest(),
          f"the node certificate's secret is labelled with the file's sha256: {label!r}")
    check(secrets_script(certs, pairs) == "", "stack-secrets.sh says nothing when the files are the secrets'")
    fn_certs = STATIC_BIN / "fn-certs"
    run([str(fn_certs), "--out", str(certs), "--rotate"])
    warned = secrets_script(certs, pairs)
    check("WARNING: the swarm secret fn-dataplane-node.pem is not" in warned
          and "Rotating the certificates" in warned and "fn-dataplane-ca.pem" not in warned,
          f"a renewed node certificate is warned of, naming its secret: {warned!r}")
    # A secret made without the label (by hand, or an older make stack-up).
    unlabelled = f"{STACK}-unlabelled"
    created.append(unlabelled)
    run(["docker", "secret", "create", unlabelled, str(certs / "ca.pem")])
    warned = secrets_script(certs, [f"{unlabelled}:ca.pem"])
    check(f"WARNING: cannot tell whether the swarm secret {unlabelled}" in warned,
          f"a secret without the label cannot be compared: {warned!r}")


def capabilities(service):
    """A service's dropped and added capabilities, without the CAP_ prefix the CLI adds."""
    spec = json.loads(run(["docker", "service", "inspect", "--format",
                           "{{json .Spec.TaskTemplate.ContainerSpec}}", service]))

    def names(caps):
        return None if caps is None else [c.removeprefix("CAP_") for c in caps]

    return names(spec.get("CapabilityDrop")), names(spec.get("CapabilityAdd"))


def scenario(lbs):
    wait_until("the LBs answer /health through the published port", lbs.healthy, 120)
    check(capabilities(f"{STACK}_lb-agent") == (["ALL"], None),
          f"the LBs run with every capability dropped: {capabilities(f'{STACK}_lb-agent')}")
    check(capabilities(f"{STACK}_npm") == (["ALL"], ["DAC_READ_SEARCH"]),
          f"the npm runs with every capability dropped but DAC_READ_SEARCH: {capabilities(f'{STACK}_npm')}")
    wait_until("the npm service runs",
               lambda: "1/1" in run(["docker", "service", "ls", "--filter", f"name={STACK}_npm",
                                     "--format", "{{.Replicas}}"]), 60)
    check(runner_services() == [], "no runner service before any call")
    # The LBs reach the npm by a name that resolves once its task runs: their first advert
    # comes a few seconds after the stack is up. Scale from zero is timed from there.
    wait_until("the LB advertises to the npm",
               lambda: "new LB advertising capacity" in service_logs(f"{STACK}_npm"), 60)

    began = time.monotonic()
    status, body = lbs.call("/r/demo/hello", b"swarm")
    TIMINGS["scale from zero: first call, runner service made and ready"] = time.monotonic() - began
    check(status == 200 and body.strip() == b"Hello, swarm!",
          f"scale from zero: the first call answers -> {status} {body[:120]!r}")
    first = runner_services()
    check(len(first) == 1, f"the first call made one runner service: {first}")
    labels = json.loads(run(["docker", "service", "inspect", "--format", "{{json .Spec.Labels}}",
                             first[0]]))
    check(labels.get("fn.dataplane.role") == "runner" and labels.get("fn.dataplane.group") == "default",
          f"the runner service is labelled: {labels}")

    # 6 calls of 3 s at 128 MB on runners of 256 MB: 3 runners.
    began = time.monotonic()
    results = burst(lbs, 6, "/r/demo/sleep", b"3000")
    TIMINGS["burst: 6 calls of 3 s needing 2 more runner services, all answered"] = time.monotonic() - began
    check(results == [200] * 6, f"a burst needing 3 runners: {sorted(results)}")
    wait_until("the burst got 3 runner services", lambda: len(runner_services()) == 3, 30)

    # A lost runner: its service removed behind the npm's back.
    lost = runner_services()[-1]
    run(["docker", "service", "rm", lost])
    statuses = [lbs.call("/r/demo/hello", b"again")[0] for _ in range(10)]
    check(statuses == [200] * 10, f"calls go on after a runner service is removed: {statuses}")
    # The npm may start a replacement while the burst's demand is still in its window (the
    # service exists from the start of its provisioning, a tick after the loss): the list
    # the restarted npm must not add to is one that has settled, unchanged over two ticks.
    def settled():
        seen = runner_services()
        time.sleep(2)
        return (seen,) if runner_services() == seen else None
    before = wait_until("the runner services settle after the loss", settled, 30)[0]

    # A killed npm is restarted by Swarm and adopts the runner services.
    npm = run(["docker", "ps", "-q", "--filter", f"label=com.docker.swarm.service.name={STACK}_npm"]).split()
    check(len(npm) == 1, f"one npm container: {npm}")
    run(["docker", "kill", npm[0]])
    wait_until("Swarm restarted the npm",
               lambda: (run(["docker", "ps", "-q", "--filter",
                             f"label=com.docker.swarm.service.name={STACK}_npm"]).split() or [npm[0]])[0] != npm[0],
               60)
    statuses = [lbs.call("/r/demo/hello", b"again")[0] for _ in range(5)]
    check(statuses == [200] * 5, f"calls during the npm restart: {statuses}")
    time.sleep(3)
    # Nothing new; one of them may be draining away by now (the burst's demand has passed).
    after = runner_services()
    check(not [s for s in after if s not in before],
          f"the restarted npm provisioned nothing new: {before} -> {after}")

    # An update of the npm's service (a rolling restart: its task stopped gracefully, a new
    # one started) leaves the runner services to the new task, which adopts them.
    kept = runner_services()
    check(kept != [], f"runner services before the npm's update: {kept}")
    old_npm = run(["docker", "ps", "-q", "--filter", f"label=com.docker.swarm.service.name={STACK}_npm"]).split()
    run(["docker", "service", "update", "--detach=false", "--force", f"{STACK}_npm"])
    wait_until("the updated npm's new task runs",
               lambda: [c for c in run(["docker", "ps", "-q", "--filter",
                                        f"label=com.docker.swarm.service.name={STACK}_npm"]).split()
                        if c not in old_npm], 60)
    statuses = [lbs.call("/r/demo/hello", b"again")[0] for _ in range(5)]
    check(statuses == [200] * 5, f"calls after the npm's update: {statuses}")
    after = runner_services()
    check([s for s in kept if s in after] != [] and not [s for s in after if s not in kept],
          f"the npm's update kept its runner services, and the new task adopted them: {kept} -> {after}")

    # A runner that crashes: Swarm restarts its task under the same service.
    crashed = runner_services()[0]
    victim = run(["docker", "ps", "-q", "--filter", f"label=com.docker.swarm.service.name={crashed}"]).split()
    check(len(victim) == 1, f"one container of {crashed}: {victim}")
    run(["docker", "kill", victim[0]])
    wait_until("Swarm restarted the crashed runner's task",
               lambda: [c for c in run(["docker", "ps", "-q", "--filter",
                                        f"label=com.docker.swarm.service.name={crashed}"]).split()
                        if c != victim[0]], 60)
    check(crashed in runner_services(), "the restarted runner keeps its service, and its place")
    statuses = [lbs.call("/r/demo/hello", b"again")[0] for _ in range(5)]
    check(statuses == [200] * 5, f"calls after a runner's task was restarted: {statuses}")

    began = time.monotonic()
    wait_until("without load the runner services drain and are removed",
               lambda: runner_services() == [], 150, interval=2)
    TIMINGS["scale to zero after the last call (FN_SCALE_DOWN_DELAY=15s)"] = time.monotonic() - began


def main():
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    initialised = False
    had_gwbridge = True
    created = []
    port = ct.free_port()
    env = dict(os.environ)
    env.update({
        "FN_LB_PUBLISH": str(port),
        # One node: host-mode publishing fits one LB on it.
        "FN_LB_REPLICAS": "1",
        "FN_IMAGE_PREFIX": os.environ.get("IMAGE_PREFIX", "fn-dataplane"),
        "FN_IMAGE_TAG": os.environ.get("IMAGE_TAG", "latest"),
        "FN_RUNNER_MEMORY_MB": "256",
        "FN_MAX_RUNNERS": "3",
        "FN_SCALE_DOWN_DELAY": "15s",
        "FN_MAX_DRAIN_TIME": "20s",
        "FN_PLACER_TIMEOUT": "60s",
    })
    with tempfile.TemporaryDirectory() as tmp:
        try:
            if swarm_state() != "active":
                print("== docker swarm init on 127.0.0.1 (left at the end)", flush=True)
                # `swarm init` makes the docker_gwbridge network and `swarm leave` keeps it:
                # remembered, so that a network the test made goes with its swarm.
                had_gwbridge = "docker_gwbridge" in networks()
                # The management port on loopback too: the default listens on every address.
                run(["docker", "swarm", "init", "--advertise-addr", "127.0.0.1",
                     "--listen-addr", "127.0.0.1:2377"])
                initialised = True
            created, certs = make_secrets(tmp)
            secret_checks(certs, created)
            # The stack file as it is, beside a catalog whose sleep function may wait for a new
            # runner service: a call waits for room at most half its timeout, and a runner
            # service takes about 10 s to come up here.
            deploy = Path(tmp) / "deploy"
            deploy.mkdir()
            (deploy / STACK_FILE.name).write_text(STACK_FILE.read_text())
            (deploy / "catalog").mkdir()
            (deploy / "catalog" / "functions.toml").write_text(CATALOG)
            print(f"== stack {STACK}, LBs on port {port}", flush=True)
            subprocess.run(["docker", "stack", "deploy", "--resolve-image", "never", "-c",
                            STACK_FILE.name, STACK], cwd=deploy, env=env,
                           check=True, capture_output=True, timeout=120)
            scenario(Lbs(port))
            run(["docker", "stack", "rm", STACK])
            wait_until("docker stack rm leaves no service or container",
                       lambda: stack_leftovers() == [], 120, interval=2)
        except Failed as e:
            if not e.counted:
                ct.failed += 1
                print(f"  FAIL {e}", flush=True)
            print("\n".join(service_logs(f"{STACK}_npm").splitlines()[-30:]), flush=True)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            ct.failed += 1
            print(f"  FAIL {e}: {getattr(e, 'stderr', '')}", flush=True)
        except (KeyboardInterrupt, SystemExit):
            ct.failed += 1
            print("  FAIL interrupted", flush=True)
        finally:
            run(["docker", "stack", "rm", STACK], check_rc=False)
            runners = run(["docker", "service", "ls", "-q", "--filter", f"label=fn.dataplane.npm={NPM_ID}"],
                          check_rc=False).split()
            if runners:
                run(["docker", "service", "rm", *runners], check_rc=False)
            deadline = time.monotonic() + 120
            while stack_leftovers() and time.monotonic() < deadline:
                time.sleep(2)
            # The overlay network goes once its last task has; what is left is removed.
            for _ in range(30):
                nets = run(["docker", "network", "ls", "-q", "--filter",
                            f"label=com.docker.stack.namespace={STACK}"], check_rc=False).split()
                if not nets:
                    break
                run(["docker", "network", "rm", *nets], check_rc=False)
                time.sleep(1)
            if created:
                run(["docker", "secret", "rm", *created], check_rc=False)
            left = stack_leftovers()
            namespace = f"label=com.docker.stack.namespace={STACK}"
            left += run(["docker", "network", "ls", "-q", "--filter", namespace], check_rc=False).split()
            left += run(["docker", "config", "ls", "-q", "--filter", namespace], check_rc=False).split()
            secrets = set(run(["docker", "secret", "ls", "--format", "{{.Name}}"], check_rc=False).split())
            left += [name for name in created if name in secrets]
            if left:
                ct.failed += 1
                print(f"  FAIL left behind: {left}", flush=True)
            if initialised:
                run(["docker", "swarm", "leave", "--force"], check_rc=False)
                if not had_gwbridge:
                    run(["docker", "network", "rm", "docker_gwbridge"], check_rc=False)
                    if "docker_gwbridge" in networks():
                        ct.failed += 1
                        print("  FAIL the docker_gwbridge network the swarm made is still there", flush=True)
                if swarm_state() != "inactive":
                    ct.failed += 1
                    print("  FAIL the swarm this test made is still there", flush=True)
    for what, seconds in TIMINGS.items():
        print(f"  time {seconds:6.1f} s  {what}", flush=True)
    print(f"swarm test took {time.monotonic() - started:.0f}s", flush=True)
    print(f"swarm: {ct.passed} passed, {ct.failed} failed", flush=True)
    return 0 if ct.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
