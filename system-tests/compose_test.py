#!/usr/bin/env python3
"""The docker compose deployment, end to end (`make test-compose`; Python 3 stdlib only).

Drives deploy/docker-compose.yml as a user would, on images `make images` built:

1. the static stack (npm + lb-agent + 3 pure-runners, with deploy/docker-compose.images.yml so
   that runners also run functions given as images): every service turns healthy; the
   example functions answer through the published LB port (which proves the LB resolves and
   reaches the runners and the npm by name); the certificates are rotated in the volume and
   every daemon picks them up without a restart; a function given as an image (built here
   FROM scratch from the static fn-hello) answers from a hardened container, which the
   runners remove when they stop; a catalog renamed over the one in the mounted catalog
   directory is what a SIGHUP to the LB loads; the runner serving a function is stopped and
   calls still succeed;
2. the autoscale override (deploy/docker-compose.autoscale.yml, FN_CONTROL_PLANE=docker):
   no runner until there is load; load makes the npm provision a runner container, labelled
   with its LB group, and calls succeed; a killed and restarted npm adopts that container
   instead of provisioning another; when the load is gone the container is drained and
   removed; new load provisions again. With FN_DOCKER_RUNNER_ENGINE the npm gives its runners
   the engine, and the image function answers there too.

Every wait is bounded. Whatever happens, the stack is torn down (compose down -v plus the
npm's runner containers by label) and the test fails if any container, network or volume
of its unique compose project is left behind.
"""

import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "deploy" / "docker-compose.yml"
AUTOSCALE = ROOT / "deploy" / "docker-compose.autoscale.yml"
IMAGES = ROOT / "deploy" / "docker-compose.images.yml"
STATIC_FUNCTIONS = ROOT / "target" / "docker-context" / "functions"
NPM_LABEL = "fn.dataplane.npm"

PROJECT = f"fntest{os.getpid()}{random.randrange(16**4):04x}"
# A function image only this run uses (so its containers are found by `ancestor`).
FUNCTION_IMAGE = f"{PROJECT}/hello:latest"
NETWORK = f"{PROJECT}_backend"  # the npm's network, hence its runner containers' npm label


class Failed(Exception):
    """A failed step; `counted` when check() has already counted and printed it."""

    def __init__(self, what, counted=False):
        super().__init__(what)
        self.counted = counted


passed = 0
failed = 0


def check(condition, what):
    global passed, failed
    if condition:
        passed += 1
        print(f"  ok   {what}", flush=True)
    else:
        failed += 1
        print(f"  FAIL {what}", flush=True)
        raise Failed(what, counted=True)


def run(args, timeout=120, env=None, check_rc=True):
    """Runs a command, bounded; returns stdout. Fails with its output when it fails."""
    try:
        done = subprocess.run(
            args, capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        raise Failed(f"{' '.join(map(str, args))}: no end within {timeout}s")
    if check_rc and done.returncode != 0:
        raise Failed(f"{' '.join(map(str, args))} exited {done.returncode}:\n{done.stdout}{done.stderr}")
    return done.stdout


def wait_until(what, condition, timeout, interval=0.5):
    """Polls `condition` until it returns something truthy, at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                check(True, what)
                return value
        except Exception as e:  # noqa: BLE001 - report the last one
            last_error = e
        time.sleep(interval)
    detail = f" (last error: {last_error})" if last_error else ""
    check(False, f"{what} within {timeout}s{detail}")


def compose_command():
    if os.environ.get("COMPOSE"):
        return os.environ["COMPOSE"].split()
    try:
        if subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=20).returncode == 0:
            return ["docker", "compose"]
    except (OSError, subprocess.TimeoutExpired):
        pass
    return ["docker-compose"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    def __init__(self, port, files, extra_env=None):
        self.compose = compose_command()
        self.port = port
        self.files = files
        self.env = dict(os.environ)
        self.env.update(
            {
                "FN_LB_PUBLISH": f"127.0.0.1:{port}",
                "FN_IMAGE_PREFIX": os.environ.get("IMAGE_PREFIX", "fn-dataplane"),
                "FN_IMAGE_TAG": os.environ.get("IMAGE_TAG", "latest"),
                "DOCKER_GID": str(os.stat("/var/run/docker.sock").st_gid),
                # For the files' own use (the runners' ids); `-p` alone is not one in 1.x.
                "COMPOSE_PROJECT_NAME": PROJECT,
                **(extra_env or {}),
            }
        )

    def __call__(self, *args, timeout=180, check_rc=True):
        cmd = [*self.compose, "-p", PROJECT]
        for f in self.files:
            cmd += ["-f", str(f)]
        return run([*cmd, *args], timeout=timeout, env=self.env, check_rc=check_rc)

    def container(self, service):
        ids = run(
            [
                "docker", "ps", "-aq",
                "--filter", f"label=com.docker.compose.project={PROJECT}",
                "--filter", f"label=com.docker.compose.service={service}",
            ]
        ).split()
        if len(ids) != 1:
            raise Failed(f"expected one container of service {service}, found {ids}")
        return ids[0]

    def health(self, service):
        return run(["docker", "inspect", "--format", "{{.State.Health.Status}}", self.container(service)]).strip()

    def call(self, path, body=b"", headers=None, timeout=30):
        """POSTs to the LB; returns (status, headers, body) for any status."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}", data=body, headers=headers or {}, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as r:
                return r.status, r.headers, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers, e.read()

    def lb_healthy(self):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as r:
                return r.status == 200
        except (urllib.error.URLError, http.client.HTTPException, OSError):
            return False


def runner_containers():
    """Names of the npm's runner containers (docker control plane), any state."""
    out = run(["docker", "ps", "-a", "--filter", f"label={NPM_LABEL}={NETWORK}", "--format", "{{.Names}}"])
    return sorted(out.split())


def expect_examples(stack, rounds=1):
    for _ in range(rounds):
        status, headers, body = stack.call("/r/demo/hello", b"you")
        check(status == 200 and body.strip() == b"Hello, you!", f"hello -> {status} {body[:60]!r}")
        check(bool(headers.get("Fn-Call-Id")), "every answer carries Fn-Call-Id")
        status, headers, body = stack.call("/r/demo/echo", b"echo me", {"Content-Type": "text/plain"})
        check(
            status == 200 and body == b"echo me" and headers.get("Content-Type") == "text/plain",
            f"echo -> {status} {body[:60]!r} {headers.get('Content-Type')}",
        )
    status, _, body = stack.call("/r/demo/sleep", b"50")
    check(status == 200, f"sleep 50ms -> {status} {body[:60]!r}")
    status, _, body = stack.call("/r/demo/crash", b"")
    check(status == 502 and b'"error"' in body, f"crash -> {status} {body[:80]!r}")


def catalog_reload(stack, catalog):
    """A catalog renamed over the mounted one, as the README says to replace it, is the one a
    SIGHUP loads (a mount of the file alone would keep the file it found at `up`)."""
    status, _, _ = stack.call("/r/demo/hello-reloaded", b"reload")
    check(status == 404, f"hello-reloaded is not in the catalog yet: {status}")
    new = catalog.with_name("functions.toml.new")
    new.write_text(
        catalog.read_text()
        + '\n[[functions]]\napp = "demo"\nname = "hello-reloaded"\nroute = "/hello-reloaded"\n'
        'command = ["fn-hello"]\nmemory_mb = 64\n'
    )
    new.chmod(0o644)
    os.replace(new, catalog)
    run(["docker", "kill", "--signal", "HUP", stack.container("lb-agent")])

    def reloaded():
        status, _, body = stack.call("/r/demo/hello-reloaded", b"reload")
        return status == 200 and body.strip() == b"Hello, reload!"

    wait_until("a catalog renamed over the mounted one is loaded at SIGHUP", reloaded, 20)


def static_stack(stack, catalog):
    print(f"== static stack (project {PROJECT}, LB on 127.0.0.1:{stack.port})", flush=True)
    stack("up", "-d")
    wait_until("the LB answers /health", stack.lb_healthy, 60)
    for service in ["npm", "lb-agent", "runner-1", "runner-2", "runner-3"]:
        wait_until(f"{service} is healthy", lambda s=service: stack.health(s) == "healthy", 60)
    check(
        run(["docker", "inspect", "--format", "{{.State.ExitCode}}", stack.container("certs")]).strip() == "0",
        "the certs one-shot exited 0",
    )
    check(
        run(["docker", "inspect", "--format", "{{.Config.User}}", stack.container("lb-agent")]).strip() == "10001:10001",
        "lb-agent runs as an unprivileged user",
    )
    for service in ["npm", "lb-agent"]:
        caps = run(["docker", "inspect", "--format", "{{json .HostConfig.CapDrop}}", stack.container(service)]).strip()
        check(caps == '["ALL"]', f"{service} runs with every capability dropped: {caps}")
    expect_examples(stack)
    image_function(stack)
    catalog_reload(stack, catalog)

    # Certificate rotation without a restart, as `make certs-rotate` runs it: new files in
    # the certs volume, picked up by every daemon within FN_TLS_RELOAD_INTERVAL (10s).
    stack("run", "--rm", "certs", "--rotate", timeout=60)
    for service in ["npm", "lb-agent", "runner-1", "runner-2", "runner-3"]:
        wait_until(
            f"{service} uses the rotated certificate without a restart",
            lambda s=service: "new certificates in use" in stack("logs", "--no-color", s, timeout=30),
            30,
        )
    check(
        all(stack.health(s) == "healthy" for s in ["npm", "lb-agent", "runner-1", "runner-2", "runner-3"]),
        "every service stays healthy through the rotation",
    )
    expect_examples(stack)

    # Stop the runner that serves hello (it runs an fn-hello instance), then call again.
    def processes(service):
        top = run(["docker", "top", stack.container(service), "-eo", "pid,user,comm"])
        return [tuple(line.split()[-2:]) for line in top.splitlines()[1:]]

    serving = [r for r in ["runner-1", "runner-2", "runner-3"] if any(c == "fn-hello" for _, c in processes(r))]
    check(len(serving) >= 1, f"a runner runs fn-hello: {serving}")
    users = [user for user, comm in processes(serving[0]) if comm == "fn-hello"]
    check(all(user.isdigit() and 100000 <= int(user) <= 165535 for user in users),
          f"functions run as a uid of their own from FN_FUNCTION_UIDS: {users}")
    run(["docker", "stop", "-t", "10", stack.container(serving[0])], timeout=60)
    print(f"  stopped {serving[0]}", flush=True)
    expect_examples(stack, rounds=5)


def function_containers():
    return run(["docker", "ps", "-aq", "--filter", f"ancestor={FUNCTION_IMAGE}"]).split()


def image_function(stack):
    """A catalog function given as an image runs on a runner's docker driver."""
    for _ in range(3):
        status, _, body = stack.call("/r/demo/hello-image", b"compose")
        check(status == 200 and body.strip() == b"Hello, compose!", f"hello-image -> {status} {body[:120]!r}")
    ids = function_containers()
    check(len(ids) == 1, f"three calls in a row use one hot function container: {ids}")
    shape = run(["docker", "inspect", "--format",
                 "{{.HostConfig.NetworkMode}} {{.Config.User}} {{.HostConfig.ReadonlyRootfs}} "
                 "{{index .Config.Labels \"fn.dataplane.role\"}}", ids[0]]).split()
    check(shape == ["none", "65534:65534", "true", "function"],
          f"the function container has no network, a non-root user, a read-only root: {shape}")
    # Labelled with a runner id of this stack alone: a runner of another stack on this
    # engine, starting, removes only the containers labelled with its own id.
    owner = run(["docker", "inspect", "--format", "{{index .Config.Labels \"fn.dataplane.runner\"}}",
                 ids[0]]).strip()
    # (`<project>-runner-<n>` in the static stack, the npm's `<project>-backend-runner-...`.)
    check(owner.startswith(f"{PROJECT}-"),
          f"the function container's runner id belongs to this stack ({PROJECT}): {owner!r}")


def build_function_image(tmp):
    binary = STATIC_FUNCTIONS / "fn-hello"
    if not binary.is_file():
        raise Failed(f"{binary} is missing: run `make images` first")
    context = Path(tmp) / "image"
    context.mkdir()
    (context / "fn-hello").write_bytes(binary.read_bytes())
    (context / "fn-hello").chmod(0o755)
    (context / "Dockerfile").write_text('FROM scratch\nCOPY fn-hello /fn-hello\nENTRYPOINT ["/fn-hello"]\n')
    run(["docker", "build", "--quiet", "--tag", FUNCTION_IMAGE, str(context)])


def autoscale_stack(stack):
    print(f"== autoscale stack (FN_CONTROL_PLANE=docker, project {PROJECT})", flush=True)
    stack("up", "-d")
    wait_until("the LB answers /health", stack.lb_healthy, 60)
    wait_until("npm is healthy", lambda: stack.health("npm") == "healthy", 60)
    static = run(["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={PROJECT}",
                  "--filter", "label=com.docker.compose.service=runner-1"]).split()
    check(static == [], "the fixed runners are off")
    check(runner_containers() == [], "no runner container before any load")

    # The first call scales from zero. A call waits for a runner for half its timeout at
    # most: hello's 30 s leave 15 s for a container to be created, started and found healthy
    # on a busy engine, where sleep's 5 s would leave 2.5 s.
    status, _, body = stack.call("/r/demo/hello", b"first")
    check(status == 200, f"the first call, from zero runners -> {status} {body!r}")
    # Load: concurrent calls; the npm provisions a runner container and they succeed.
    results = []
    def one():
        results.append(stack.call("/r/demo/sleep", b"300")[0])
    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    check(results == [200] * 4, f"4 concurrent calls under load -> {results}")
    runners = runner_containers()
    check(len(runners) >= 1, f"a runner container appeared: {runners}")
    labels = json.loads(run(["docker", "inspect", "--format", "{{json .Config.Labels}}", runners[0]]))
    check(labels.get("fn.dataplane.group") == "default", f"labelled with its LB group: {labels}")
    check(
        run(["docker", "inspect", "--format", "{{.HostConfig.ReadonlyRootfs}} {{.HostConfig.CapDrop}}", runners[0]]).strip()
        == "true [ALL]",
        "runner container: read-only root, capabilities dropped",
    )
    expect_examples(stack)
    # FN_DOCKER_RUNNER_ENGINE: the npm gave its runners the engine.
    image_function(stack)

    # A killed npm finds its runners again instead of provisioning more.
    npm = stack.container("npm")
    run(["docker", "kill", npm])
    run(["docker", "start", npm])
    wait_until("the restarted npm is healthy", lambda: stack.health("npm") == "healthy", 60)
    expect_examples(stack)
    check(runner_containers() == runners, f"after the npm restart the same runners: {runner_containers()}")

    # No load: drained and removed; new load provisions again.
    wait_until("idle runner containers are removed", lambda: runner_containers() == [], 90)
    status, _, body = stack.call("/r/demo/hello", b"again")
    check(status == 200 and body.strip() == b"Hello, again!", f"hello after scale-down -> {status} {body!r}")
    check(len(runner_containers()) == 1, f"one runner container again: {runner_containers()}")


def leftovers():
    project = f"label=com.docker.compose.project={PROJECT}"
    found = []
    found += run(["docker", "ps", "-aq", "--filter", project]).split()
    found += run(["docker", "ps", "-aq", "--filter", f"label={NPM_LABEL}={NETWORK}"]).split()
    found += function_containers()
    found += [n for n in run(["docker", "network", "ls", "--format", "{{.Name}}"]).split() if n.startswith(PROJECT)]
    found += [v for v in run(["docker", "volume", "ls", "--format", "{{.Name}}"]).split() if v.startswith(PROJECT)]
    return found


def teardown(stack):
    print(f"== teardown (project {PROJECT})", flush=True)
    if stack is not None:
        stack("stop", "-t", "30", "npm", timeout=90, check_rc=False)
    runners = run(["docker", "ps", "-aq", "--filter", f"label={NPM_LABEL}={NETWORK}"], check_rc=False).split()
    if runners:
        run(["docker", "rm", "-f", *runners], check_rc=False)
    if stack is not None:
        stack("down", "-v", "--remove-orphans", "-t", "10", timeout=180, check_rc=False)
    left = leftovers()
    # Belt and braces: whatever compose could not remove.
    if left:
        run(["docker", "rm", "-f", *left], check_rc=False)
        run(["docker", "network", "rm", *left], check_rc=False)
        run(["docker", "volume", "rm", *left], check_rc=False)
    return left


def dump_logs(stack):
    if stack is None:
        return
    print("-- compose logs (last 40 lines per service)", flush=True)
    print(stack("logs", "--no-color", "--tail", "40", timeout=60, check_rc=False), flush=True)
    for name in runner_containers():
        print(f"-- {name}", flush=True)
        print(run(["docker", "logs", "--tail", "40", name], check_rc=False), flush=True)


def main():
    global passed, failed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    port = free_port()
    stack = None
    with tempfile.TemporaryDirectory() as tmp:
        # Test-only settings on top of the user-facing files: scale down soon. Not sooner: a
        # restarted npm keeps the runners it adopts for one such window before it judges
        # their demand, and the adoption check must fall inside that window.
        fast = Path(tmp) / "fast-scale-down.yml"
        fast.write_text(
            "services:\n"
            "  npm:\n"
            "    environment:\n"
            '      FN_SCALE_DOWN_DELAY: "20s"\n'
            '      FN_MAX_DRAIN_TIME: "20s"\n'
        )
        # The example catalog plus a function given as an image, for the LB of the static
        # stack, in a directory of its own mounted where the compose file mounts deploy/catalog.
        catalog = Path(tmp) / "catalog" / "functions.toml"
        catalog.parent.mkdir(mode=0o755)
        catalog.parent.chmod(0o755)
        catalog.write_text(
            (ROOT / "deploy" / "catalog" / "functions.toml").read_text()
            + f'\n[[functions]]\napp = "demo"\nname = "hello-image"\nroute = "/hello-image"\n'
            f'image = "{FUNCTION_IMAGE}"\nmemory_mb = 64\n'
        )
        catalog.chmod(0o644)
        with_image = Path(tmp) / "image-catalog.yml"
        with_image.write_text(
            "services:\n"
            "  lb-agent:\n"
            "    volumes:\n"
            f"      - {catalog.parent}:/etc/fn:ro\n"
        )
        Path(tmp).chmod(0o755)
        iofs = Path(tempfile.mkdtemp(prefix=f"{PROJECT}-iofs", dir="/tmp"))
        try:
            build_function_image(tmp)
            stack = Stack(port, [BASE, IMAGES, with_image], {"FN_DOCKER_IOFS_DIR": str(iofs)})
            static_stack(stack, catalog)
            stack("down", "-v", "--remove-orphans", "-t", "10")
            check(leftovers() == [], "the static stack's down -v leaves nothing (function containers included)")
            stack = Stack(
                port,
                [BASE, AUTOSCALE, fast, with_image],
                {"FN_DOCKER_RUNNER_ENGINE": "/var/run/docker.sock", "FN_DOCKER_IOFS_DIR": str(iofs)},
            )
            autoscale_stack(stack)
        except Failed as e:
            if not e.counted:
                failed += 1
                print(f"  FAIL {e}", flush=True)
            dump_logs(stack)
        except (KeyboardInterrupt, SystemExit):
            failed += 1
            print("  FAIL interrupted", flush=True)
        finally:
            left = teardown(stack)
            run(["docker", "image", "rm", "--force", FUNCTION_IMAGE], check_rc=False)
            subprocess.run(["rm", "-rf", str(iofs)], check=False)
            if left:
                failed += 1
                print(f"  FAIL left behind after teardown: {left}", flush=True)
            else:
                passed += 1
                print("  ok   teardown left no container, network or volume behind", flush=True)
    print(f"compose test took {time.monotonic() - started:.0f}s", flush=True)
    print(f"compose: {passed} passed, {failed} failed", flush=True)
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
