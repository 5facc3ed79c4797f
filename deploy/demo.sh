#!/usr/bin/env bash
# `make demo`: the dataplane on this machine. Starts the npm (process control plane: it
# spawns pure-runner processes as demand requires) and an lb-agent with the example
# catalog, prints calls to try, and stops everything on Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${BIN:-target/debug}
DEMO=${DEMO_DIR:-.demo}
# Absolute from here on: the daemons get these paths, and BIN=/x or DEMO_DIR=/y may be given.
case $BIN in /*) ;; *) BIN=$PWD/$BIN ;; esac
case $DEMO in /*) ;; *) DEMO=$PWD/$DEMO ;; esac
LB_PORT=${FN_PORT:-8080}
NPM_PORT=${FN_NPM_PORT:-9120}

for b in lb-agent npm pure-runner fn-certs fn-hello fn-echo fn-sleep fn-crash; do
  [ -x "$BIN/$b" ] || { echo "demo: $BIN/$b missing; run: cargo build --workspace --bins" >&2; exit 1; }
done

# Runners start only programs inside their functions directory: give them the examples
# only, in a directory the unprivileged function user can reach even when this checkout
# sits under a private one: the demo's own (made here), or FN_DEMO_FUNCTIONS_DIR.
OWN=${TMPDIR:-/tmp}/fn-demo-$(id -u)
FUNCTIONS=${FN_DEMO_FUNCTIONS_DIR:-$OWN/functions}
ABOVE=$(dirname "$FUNCTIONS")
mkdir -p "$FUNCTIONS" "$DEMO/logs"
# Under a shared /tmp another user may have made these first, or may replace them, and
# could then swap the programs the runners start. The functions' directory must be this
# user's; so must the demo's own above it, which the function users pass through. A
# directory above that was given (/tmp, a home directory) is left as it is, but must be
# this user's or root's, and writable by no one else unless sticky (as /tmp).
me=$(id -u)
refuse() {
  echo "demo: $1; remove it or set FN_DEMO_FUNCTIONS_DIR elsewhere" >&2
  exit 1
}
if [ -L "$FUNCTIONS" ] || [ "$(stat -c %u "$FUNCTIONS")" != "$me" ]; then
  refuse "$FUNCTIONS belongs to another user (or is a link)"
fi
if [ "$ABOVE" = "$OWN" ]; then
  if [ -L "$OWN" ] || [ "$(stat -c %u "$OWN")" != "$me" ]; then
    refuse "$OWN belongs to another user (or is a link)"
  fi
  chmod 0755 "$OWN"
else
  owner=$(stat -c %u "$ABOVE")
  mode=$((8#$(stat -c %a "$ABOVE")))
  if [ -L "$ABOVE" ] || { [ "$owner" != "$me" ] && [ "$owner" != 0 ]; } ||
    { [ $((mode & 8#022)) != 0 ] && [ $((mode & 8#1000)) = 0 ]; }; then
    refuse "$ABOVE is a link, another user's, or others may write it and replace $FUNCTIONS"
  fi
  # Root's runners run each function as a user of its own, and start only when those can
  # reach the functions (their logs name any directory further up that is closed).
  if [ "$me" = 0 ] && [ $((mode & 8#001)) = 0 ]; then
    refuse "$ABOVE is closed to other users, so the functions (each run as a user of its own) could not reach $FUNCTIONS"
  fi
fi
chmod 0755 "$FUNCTIONS"
cp -f "$BIN"/fn-hello "$BIN"/fn-echo "$BIN"/fn-sleep "$BIN"/fn-crash "$FUNCTIONS/"
"$BIN/fn-certs" --out "$DEMO/certs" --keep >/dev/null

export FN_NODE_CERT_AUTHORITY="$DEMO/certs/ca.pem"
export FN_NODE_CERT="$DEMO/certs/node.pem"
export FN_NODE_CERT_KEY="$DEMO/certs/node-key.pem"
export FN_LISTEN_ADDR=127.0.0.1
# Every daemon shares this machine's cores: one worker thread each is faster here.
export FN_WORKER_THREADS=1

pids=()
# Stops the daemons and exits with `status`. The messages may go to a terminal that is gone
# (a hangup): they must not stop the clean-up.
cleanup() {
  local status=$1
  trap - INT TERM HUP EXIT
  { echo; echo "demo: stopping (the npm stops the runners it spawned)..."; } 2>/dev/null || true
  # A terminal's Ctrl-C reaches the daemons too (they are in this script's process group),
  # and they may take it just before or just after the SIGTERM below: either way, a signal
  # within half a second of the first is the same stop to them (SAME_STOP_WINDOW in
  # crates/lifecycle/src/signal.rs), never a second Ctrl-C that would cut their calls.
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  echo "demo: stopped; logs are in $DEMO/logs" 2>/dev/null || true
  exit "$status"
}
trap 'cleanup 130' INT
trap 'cleanup 143' TERM
# The terminal closed: the daemons take SIGHUP as "reload", so they are stopped here.
trap 'cleanup 129' HUP
trap 'cleanup $? EXIT' EXIT

FN_GRPC_PORT=$NPM_PORT \
FN_CONTROL_PLANE=process \
FN_RUNNER_BINARY="$BIN/pure-runner" \
FN_RUNNER_FUNCTIONS_DIR="$FUNCTIONS" \
FN_RUNNER_STATE_DIR="$DEMO/runners" \
FN_RUNNER_MEMORY_MB=${FN_RUNNER_MEMORY_MB:-512} \
FN_SCALE_DOWN_DELAY=${FN_SCALE_DOWN_DELAY:-20s} \
  "$BIN/npm" >"$DEMO/logs/npm.log" 2>&1 &
pids+=($!)

# The lb-agent takes every call first: one shard (event-loop thread) per CPU. No balancer
# in front of it has to see its /health fail before it stops taking calls, so it stops at
# once on Ctrl-C (calls in flight still finish).
FN_SHARDS=${FN_LB_SHARDS:-auto} \
FN_DRAIN_DELAY=${FN_DRAIN_DELAY:-0s} \
FN_PORT=$LB_PORT \
FN_NPM_ADDRESS=127.0.0.1:$NPM_PORT \
FN_FUNCTIONS_FILE="${FN_DEMO_FUNCTIONS_FILE:-$PWD/deploy/catalog/functions.toml}" \
  "$BIN/lb-agent" >"$DEMO/logs/lb-agent.log" 2>&1 &
pids+=($!)

# Both daemons must still run: with the port taken (a compose stack publishes 8080 too), the
# lb-agent exits and /health would be another LB's answer.
alive() {
  for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null || return 1; done
}
for _ in $(seq 1 100); do
  alive || break
  curl -fsS "http://127.0.0.1:$LB_PORT/health" >/dev/null 2>&1 && break
  sleep 0.1
done
if ! alive; then
  echo "demo: a daemon exited at start (a port in use? set FN_PORT or FN_NPM_PORT); see $DEMO/logs" >&2
  tail -n 3 "$DEMO/logs/lb-agent.log" "$DEMO/logs/npm.log" >&2 || true
  exit 1
fi
curl -fsS "http://127.0.0.1:$LB_PORT/health" >/dev/null || { echo "demo: lb-agent did not come up; see $DEMO/logs" >&2; exit 1; }

cat <<EOT

The dataplane is running: lb-agent on http://127.0.0.1:$LB_PORT, npm on 127.0.0.1:$NPM_PORT.
No runners yet: the first call makes the npm spawn one (watch $DEMO/logs/npm.log).

  curl -i http://127.0.0.1:$LB_PORT/r/demo/hello -d 'Ada'
  curl -i http://127.0.0.1:$LB_PORT/r/demo/echo -H 'Content-Type: text/plain' -d 'echo me'
  curl -i -X POST http://127.0.0.1:$LB_PORT/invoke/demo/sleep -d 1000
  curl -i http://127.0.0.1:$LB_PORT/r/demo/sleep -d 9000     # 504: past its 5s timeout
  curl -i http://127.0.0.1:$LB_PORT/r/demo/crash -d x        # 502: the function died
  for i in \$(seq 20); do curl -s http://127.0.0.1:$LB_PORT/r/demo/sleep -d 2000 & done; wait

Runners drain and stop ${FN_SCALE_DOWN_DELAY:-20s} after the load ends. Ctrl-C stops everything.
EOT
wait -n "${pids[@]}" || true
echo "demo: a daemon exited; see $DEMO/logs" >&2
exit 1
