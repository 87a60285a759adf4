#!/usr/bin/env bash
# Starts a fleet on one machine: N `cortexstream serve` processes and, in front of them, a router
# (vllm-router or sglang-router), then waits until Ctrl-C or SIGTERM and stops everything it
# started. See docs/deploy.md for what each routing policy needs from the servers.
#
#   scripts/fleet.sh [options] [-- extra arguments of every server]
#
#   -n, --servers N           servers to start (default 3)
#   --host H                  address every process listens on (default 127.0.0.1)
#   --base-port P             server i (0-based) listens on P+i (default 8100)
#   --events-base-port E      server i publishes KV events on tcp://H:E+i (default P+100);
#                             --no-kv-events: none (kv_aware then has nothing to work with)
#   --router vllm|sglang|none router in front (default vllm)
#   --policy NAME             routing policy: kv_aware, cache_aware, round_robin, power_of_two
#                             (or any other the router knows); default kv_aware for vllm-router,
#                             cache_aware for sglang-router (which has no kv_aware)
#   --router-port R           router port (default 30000)
#   --router-metrics-port M   router Prometheus port (default: a free port; both routers default
#                             to 29000, which a second router on the machine would collide with)
#   --router-args "ARGS"      more router arguments, split on spaces
#   --model M                 GGUF file (default models/SmolLM2-135M-Instruct.Q4_1.gguf)
#   --bin B                   cortexstream binary (default build/src/cli/cortexstream)
#   --threads T               compute threads per server (default 1)
#   --kv-cache-memory SIZE    KV pool per server (default 512MiB)
#   --log-dir DIR             logs: server-I.log, router.log (default: a new folder under /tmp)
#   --startup-timeout S       seconds each process may take to become healthy (default 120)
#   -h, --help                this text
#
# Environment: VLLM_ROUTER (default vllm-router), PYTHON (default python3, runs
# `-m sglang_router.launch_router`).
#
# Example: three servers behind vllm-router's kv_aware policy, then a request through the router:
#   scripts/fleet.sh --policy kv_aware -- --max-num-seqs 16
#   curl -s localhost:30000/v1/completions -H 'Content-Type: application/json' \
#     -d '{"prompt": "The capital of France is", "max_tokens": 8}'
#
# The routers check each server's /health every second here (their default is a minute), so a
# server that stops or drains is taken out of rotation within a few seconds.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

n=3
host=127.0.0.1
base_port=8100
events_base_port=
kv_events=1
router=vllm
policy=
router_port=30000
router_metrics_port=
router_args=
model="$root/models/SmolLM2-135M-Instruct.Q4_1.gguf"
bin="$root/build/src/cli/cortexstream"
threads=1
kv_cache_memory=512MiB
log_dir=
startup_timeout=120
server_args=()

need() { [[ $# -ge 2 ]] || { echo "fleet.sh: $1 needs a value" >&2; exit 2; }; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    -n|--servers) need "$@"; n="$2"; shift 2 ;;
    --host) need "$@"; host="$2"; shift 2 ;;
    --base-port) need "$@"; base_port="$2"; shift 2 ;;
    --events-base-port) need "$@"; events_base_port="$2"; shift 2 ;;
    --no-kv-events) kv_events=0; shift ;;
    --router) need "$@"; router="$2"; shift 2 ;;
    --policy) need "$@"; policy="$2"; shift 2 ;;
    --router-port) need "$@"; router_port="$2"; shift 2 ;;
    --router-metrics-port) need "$@"; router_metrics_port="$2"; shift 2 ;;
    --router-args) need "$@"; router_args="$2"; shift 2 ;;
    --model) need "$@"; model="$2"; shift 2 ;;
    --bin) need "$@"; bin="$2"; shift 2 ;;
    --threads) need "$@"; threads="$2"; shift 2 ;;
    --kv-cache-memory) need "$@"; kv_cache_memory="$2"; shift 2 ;;
    --log-dir) need "$@"; log_dir="$2"; shift 2 ;;
    --startup-timeout) need "$@"; startup_timeout="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; server_args=("$@"); break ;;
    *) echo "fleet.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

[[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "fleet.sh: --servers wants a positive integer" >&2; exit 2; }
if [[ ! -x "$bin" ]]; then
  echo "fleet.sh: $bin not found (scripts/build.sh release cortexstream)" >&2
  exit 2
fi
[[ -f "$model" ]] || { echo "fleet.sh: $model not found (scripts/fetch_model.sh)" >&2; exit 2; }
events_base_port="${events_base_port:-$((base_port + 100))}"
case "$router" in
  vllm) policy="${policy:-kv_aware}" ;;
  sglang)
    policy="${policy:-cache_aware}"
    if [[ "$policy" == kv_aware ]]; then
      echo "fleet.sh: sglang-router has no kv_aware policy (use --router vllm)" >&2; exit 2
    fi ;;
  none) ;;
  *) echo "fleet.sh: --router is vllm, sglang or none" >&2; exit 2 ;;
esac
if [[ -z "$log_dir" ]]; then
  log_dir="$(mktemp -d "${TMPDIR:-/tmp}/cortexstream-fleet.XXXXXX")"
else
  mkdir -p "$log_dir"
fi

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])'
}

# ---- process bookkeeping: every process runs in a session of its own (setsid), so that stopping
# it stops whatever it started too, and a Ctrl-C in the terminal reaches only this script.
pids=()
names=()
stopping=0

stop_all() {
  [[ $stopping -eq 1 ]] && return
  stopping=1
  trap '' INT TERM
  local i
  # The router first (no new traffic), then the servers, which finish what they run.
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    kill -TERM -- "-${pids[i]}" 2>/dev/null || true
  done
  local deadline=$((SECONDS + 40))
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    while kill -0 "${pids[i]}" 2>/dev/null && [[ $SECONDS -lt $deadline ]]; do sleep 0.2; done
    if kill -0 "${pids[i]}" 2>/dev/null; then
      echo "fleet.sh: ${names[i]} still running after SIGTERM; killing it" >&2
      kill -KILL -- "-${pids[i]}" 2>/dev/null || true
    fi
    wait "${pids[i]}" 2>/dev/null || true
  done
  echo "fleet.sh: stopped (logs in $log_dir)" >&2
}
trap 'stop_all; exit 130' INT
trap 'stop_all; exit 143' TERM
trap 'stop_all' EXIT

start() {  # start NAME LOGFILE COMMAND...
  local name="$1" logf="$2"
  shift 2
  echo "fleet.sh: $name: $*" >&2
  setsid "$@" >"$logf" 2>&1 </dev/null &
  pids+=("$!")
  names+=("$name")
}

wait_http() {  # wait_http NAME PID URL: until URL answers 200, or the process exits
  local name="$1" pid="$2" url="$3" deadline=$((SECONDS + startup_timeout))
  while ! curl -sf -o /dev/null --max-time 2 "$url"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "fleet.sh: $name exited before $url answered; its log ends with:" >&2
      tail -n 15 "$log_dir/$name.log" >&2 || true
      exit 1
    fi
    if [[ $SECONDS -ge $deadline ]]; then
      echo "fleet.sh: $name: no answer from $url after ${startup_timeout} s" >&2
      exit 1
    fi
    sleep 0.3
  done
}

# ---- servers
urls=()
for ((i = 0; i < n; i++)); do
  port=$((base_port + i))
  cmd=("$bin" serve --model "$model" --host "$host" --port "$port" --threads "$threads"
       --kv-cache-memory "$kv_cache_memory")
  if [[ $kv_events -eq 1 ]]; then
    cmd+=(--kv-events-endpoint "tcp://$host:$((events_base_port + i))")
  fi
  start "server-$i" "$log_dir/server-$i.log" "${cmd[@]}" "${server_args[@]}"
  urls+=("http://$host:$port")
done
for ((i = 0; i < n; i++)); do
  wait_http "server-$i" "${pids[i]}" "${urls[i]}/health"
done

# ---- router
router_url=
if [[ "$router" != none ]]; then
  router_metrics_port="${router_metrics_port:-$(free_port)}"
  # Health checks every second; a worker is out after 3 failed checks and back after 1 good one.
  health=(--health-check-interval-secs 1 --health-check-timeout-secs 2
          --health-failure-threshold 3 --health-success-threshold 1
          --worker-startup-check-interval 1)
  read -r -a extra <<<"$router_args"
  if [[ "$router" == vllm ]]; then
    rcmd=("${VLLM_ROUTER:-vllm-router}")
  else
    rcmd=("${PYTHON:-python3}" -m sglang_router.launch_router)
  fi
  if [[ "$router" == vllm && "$policy" == kv_aware ]]; then
    # CortexStream's KV cache is in host memory (its events say medium "CPU"), which kv_aware
    # would otherwise credit at 0.8 as if the blocks had to be moved to a device first.
    rcmd+=(--kv-penalty-host 1.0)
  fi
  rcmd+=(--host "$host" --port "$router_port" --policy "$policy"
         --prometheus-port "$router_metrics_port" "${health[@]}" --worker-urls "${urls[@]}"
         "${extra[@]}")
  start router "$log_dir/router.log" "${rcmd[@]}"
  router_url="http://$host:$router_port"
  wait_http router "${pids[n]}" "$router_url/health"
  # Both routers register workers in the background: wait until the router lists the model.
  deadline=$((SECONDS + startup_timeout))
  until curl -sf --max-time 2 "$router_url/v1/models" | grep -q '"id"'; do
    if [[ $SECONDS -ge $deadline ]] || ! kill -0 "${pids[n]}" 2>/dev/null; then
      echo "fleet.sh: the router lists no model (see $log_dir/router.log)" >&2
      exit 1
    fi
    sleep 0.3
  done
fi

echo "fleet.sh: ready (logs in $log_dir)" >&2
for ((i = 0; i < n; i++)); do
  if [[ $kv_events -eq 1 ]]; then
    echo "server-$i ${urls[i]} kv-events tcp://$host:$((events_base_port + i))"
  else
    echo "server-$i ${urls[i]}"
  fi
done
if [[ -n "$router_url" ]]; then
  echo "router $router_url ($router, policy $policy, metrics port $router_metrics_port)"
fi
echo "fleet.sh: Ctrl-C stops everything" >&2

# ---- run until a signal; report a process that exits on its own. The router going away ends
# the fleet; a server going away does not (the router routes around it).
alive=("${pids[@]}")
while true; do
  sleep 1
  for ((i = 0; i < ${#pids[@]}; i++)); do
    [[ -n "${alive[i]}" ]] || continue
    if ! kill -0 "${pids[i]}" 2>/dev/null; then
      alive[i]=
      status=0
      wait "${pids[i]}" || status=$?
      echo "fleet.sh: ${names[i]} exited with status $status (log: $log_dir/${names[i]}.log)" >&2
      if [[ "${names[i]}" == router ]]; then
        exit 1
      fi
    fi
  done
done
