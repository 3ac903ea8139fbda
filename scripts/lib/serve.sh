# shellcheck shell=bash
# Sourced by the scripts that measure a real `hongbao serve` (bench, bench-ab, wrk-storm): fresh
# keys, and a server started on a free loopback port and waited for.

# The HTTP connections the benchmarks open by default (scripts/bench, scripts/bench-ab): enough
# claims in flight for the festival to keep both cores as busy as healthz does. Each claim waits
# about a millisecond for its batch's commit, and with 256 connections the festival left 8 % of
# the machine idle where healthz left 3 % (BENCHMARKS.md, thirty-ninth session). hongbao-bench
# defaults to the same over HTTP (`HTTP_CONCURRENCY`); the scripts pass it, `wrk` included.
# shellcheck disable=SC2034 # read by the scripts that source this file
HTTP_CONNECTIONS=512

# Prints the comment block at the top of the calling script, after its `#!` line: its --help.
usage() { awk 'NR > 1 { if (!/^#/) exit; print }' "$0"; }

# 32 random hex digits.
key() { od -An -N16 -tx1 /dev/urandom | tr -d ' \n'; }

# Exports a fresh HONGBAO_API_KEY and HONGBAO_ADMIN_KEY, for the server and the clients alike.
fresh_keys() {
  HONGBAO_API_KEY="svc-$(key)"; HONGBAO_ADMIN_KEY="adm-$(key)"
  export HONGBAO_API_KEY HONGBAO_ADMIN_KEY
}

# serve DIR BIN [serve options…]: starts `BIN serve` on a free loopback port with its data in
# DIR/data, its standard output in DIR/out and its log in DIR/err (warnings and worse, unless
# HONGBAO_LOG says otherwise), and waits until it listens. Sets `server` (its pid) and `url`.
# Fails, showing the log, if the server exits first or does not listen within 30 s.
serve() {
  local dir=$1 bin=$2; shift 2
  HONGBAO_LOG=${HONGBAO_LOG:-warn} "$bin" serve --listen 127.0.0.1:0 --data "$dir/data" "$@" \
    > "$dir/out" 2> "$dir/err" &
  server=$!
  url=""
  for _ in $(seq 300); do
    url=$(sed -n 's/^hongbao listening on //p' "$dir/out")
    [ -n "$url" ] && return 0
    kill -0 "$server" 2>/dev/null || break
    sleep 0.1
  done
  echo "hongbao serve ($bin) did not start listening:" >&2
  cat "$dir/err" >&2
  return 1
}

# Stops the server `serve` started, if one is running, and waits for it.
stop_server() {
  if [ -n "${server:-}" ]; then kill -TERM "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; fi
  server=""
}
