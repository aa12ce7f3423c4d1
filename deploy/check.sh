#!/usr/bin/env bash
# Checks the operations files (deploy/, docker-compose.yml) and the live
# /metrics exposition. Run from anywhere; it works from the repository root.
#
#   bash deploy/check.sh
#
# 1. promtool check rules / test rules / check config (Prometheus files)
# 2. docker-compose config -q (the compose file; no Docker engine needed)
# 3. the Grafana dashboard and provisioning parse (JSON / YAML)
# 4. promtool check metrics on a live scrape of `chat-janitor serve`
#    (embedded defaults, one event sent so histograms have observations)
#
# Installs Debian's `prometheus` (for promtool) and `docker-compose` when
# missing. Builds the binary with `cargo build` when target/ has none.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n== %s\n' "$*"; }

need_apt=()
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
command -v docker-compose >/dev/null 2>&1 || need_apt+=(docker-compose)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
if [ ${#need_apt[@]} -gt 0 ]; then
  log "installing ${need_apt[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# --- Prometheus ---------------------------------------------------------------
log "promtool check rules deploy/prometheus/alerts.yml"
promtool check rules deploy/prometheus/alerts.yml

log "promtool test rules deploy/prometheus/alerts.test.yml"
promtool test rules deploy/prometheus/alerts.test.yml

# rule_files in prometheus.yml are relative to the file itself, so this
# resolves deploy/prometheus/alerts.yml here and /etc/prometheus/alerts.yml in
# the container.
log "promtool check config deploy/prometheus/prometheus.yml"
promtool check config deploy/prometheus/prometheus.yml

# --- docker-compose -----------------------------------------------------------
log "docker-compose -f docker-compose.yml config -q"
docker-compose -f docker-compose.yml config -q

# --- Grafana ------------------------------------------------------------------
log "dashboard JSON and provisioning YAML"
python3 -m json.tool deploy/grafana/dashboards/chat-janitor.json >/dev/null
python3 - <<'EOF'
import json, sys

d = json.load(open("deploy/grafana/dashboards/chat-janitor.json"))
ids = [p["id"] for p in d["panels"]]
assert len(ids) == len(set(ids)), "duplicate panel ids"
assert d["uid"] and d["schemaVersion"] >= 36, "uid / schemaVersion"
exprs = [t["expr"] for p in d["panels"] for t in p.get("targets", [])]
assert exprs and all("chat_janitor_" in e for e in exprs), "every query reads chat_janitor_ metrics"
print(f"  {len(d['panels'])} panels, {len(exprs)} queries")
EOF
# The provisioning files are YAML: parse them with a Python that has PyYAML
# (Debian's, which docker-compose depends on, has it).
py=python3
python3 -c 'import yaml' 2>/dev/null || py=/usr/bin/python3
for f in deploy/grafana/provisioning/datasources/prometheus.yml \
         deploy/grafana/provisioning/dashboards/chat-janitor.yml; do
  "$py" -c 'import sys, yaml; yaml.safe_load(open(sys.argv[1]))' "$f"
done

# --- live /metrics ------------------------------------------------------------
log "promtool check metrics on a live scrape"
# The release binary if there is one (and it is not older than the debug one),
# else the debug binary, else build one.
if [ -x target/release/chat-janitor ] &&
   ! [ target/debug/chat-janitor -nt target/release/chat-janitor ]; then
  bin="$PWD/target/release/chat-janitor"
elif [ -x target/debug/chat-janitor ]; then
  bin="$PWD/target/debug/chat-janitor"
else
  log "cargo build (no chat-janitor binary in target/)"
  cargo build
  bin="$PWD/target/debug/chat-janitor"
fi
echo "  binary: $bin"

tmp="$(mktemp -d)"
server_pid=""
cleanup() {
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    kill -TERM "$server_pid" 2>/dev/null || true
    for _ in $(seq 1 50); do
      kill -0 "$server_pid" 2>/dev/null || break
      sleep 0.2
    done
    kill -KILL "$server_pid" 2>/dev/null || true
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT

port=18080
if curl -s -o /dev/null "http://127.0.0.1:$port/" 2>/dev/null; then
  echo "something already listens on 127.0.0.1:$port; stop it first" >&2
  exit 1
fi
(
  cd "$tmp"   # no config/ here: the embedded defaults apply
  exec env CHAT_JANITOR__SERVER__LISTEN="127.0.0.1:$port" \
    CHAT_JANITOR__EMULATOR__LISTEN=127.0.0.1:0 \
    CHAT_JANITOR__JOURNAL__PATH="$tmp/data" \
    "$bin" serve >"$tmp/serve.log" 2>&1
) &
server_pid=$!

ready=""
for _ in $(seq 1 100); do
  if curl -fsS "http://127.0.0.1:$port/healthz" >/dev/null 2>&1; then
    ready=yes
    break
  fi
  kill -0 "$server_pid" 2>/dev/null || break
  sleep 0.2
done
if [ -z "$ready" ]; then
  echo "chat-janitor did not answer /healthz on 127.0.0.1:$port; its log:" >&2
  cat "$tmp/serve.log" >&2
  exit 1
fi

"$bin" send user.banned --user 107867 --channel '@TOA#_news' \
  --url "http://127.0.0.1:$port/v1/events"

# Wait for the event to settle (linger_ms, then one upstream call), so the
# histograms have an observation.
settled=""
for _ in $(seq 1 50); do
  curl -fsS "http://127.0.0.1:$port/metrics" >"$tmp/metrics.txt"
  if grep -Eq '^chat_janitor_event_settle_seconds_count [1-9]' "$tmp/metrics.txt"; then
    settled=yes
    break
  fi
  sleep 0.2
done
[ -n "$settled" ] || echo "  warning: the event had not settled; checking the exposition anyway"
echo "  $(grep -c '^chat_janitor_' "$tmp/metrics.txt") chat_janitor_ samples"

# Every metric the dashboard and the alerts read must be exposed.
for m in events_received_total events_rejected_total upstream_requests_total \
         upstream_request_duration_seconds_bucket batch_items_bucket items_total \
         pending_items open_batches circuit_open event_settle_seconds_bucket \
         dead_letters_total journal_events journal_write_errors_total \
         journal_file_bytes journal_filesystem_free_bytes dispatch_active \
         broker_connected callbacks_lost_total callback_oldest_pending_seconds; do
  grep -q "^chat_janitor_${m}[{ ]" "$tmp/metrics.txt" \
    || { echo "missing from /metrics: chat_janitor_${m}" >&2; exit 1; }
done

promtool check metrics <"$tmp/metrics.txt"

log "deploy/check.sh: all checks passed"
