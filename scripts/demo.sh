#!/usr/bin/env bash
# make demo: local Consul and Nomad dev agents with the zeroscale plugin and
# the nginx example with a short idle_timeout. Ctrl-C tears everything down.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
demo="$root/.demo"
bin="$root/.bin"
idle="${IDLE_TIMEOUT:-20s}"
port="${PORT:-8081}"
consul_http=18500
consul_dns=18600
nomad_http=14646
pin=/sys/fs/bpf/zeroscale-demo

if [ "$(id -u)" -ne 0 ]; then
  echo "make demo: the XDP gate needs root; run it as root" >&2
  exit 1
fi
for p in $consul_http $consul_dns $nomad_http $port; do
  if ss -Hltn "sport = :$p" | grep -q .; then
    echo "make demo: port $p is in use (another demo running?)" >&2
    exit 1
  fi
done

rm -rf "$demo"
mkdir -p "$demo/plugins" "$demo/nomad-data"
chmod 755 "$demo" "$demo/nomad-data"
cp "$root/build/nomad-driver-zeroscale" "$demo/plugins/"

cat >"$demo/consul.hcl" <<EOF
node_name   = "zeroscale-demo"
bind_addr   = "127.0.0.1"
client_addr = "127.0.0.1"
ports {
  http     = $consul_http
  dns      = $consul_dns
  grpc     = -1
  grpc_tls = -1
}
EOF

cat >"$demo/nomad.hcl" <<EOF
name       = "zeroscale-demo"
bind_addr  = "127.0.0.1"
data_dir   = "$demo/nomad-data"
plugin_dir = "$demo/plugins"
ports {
  http = $nomad_http
}
consul {
  address = "127.0.0.1:$consul_http"
}
client {
  network_interface = "lo"
  options = {
    "fingerprint.denylist" = "env_aws,env_gce,env_azure,env_digitalocean"
  }
}
plugin "nomad-driver-zeroscale" {
  config {
    interfaces      = ["lo"]
    metrics_address = "127.0.0.1:9464"
    bpf_pin_path    = "$pin"
    nomad {
      address = "http://127.0.0.1:$nomad_http"
    }
    consul {
      address = "127.0.0.1:$consul_http"
    }
  }
}
EOF

pids=()
cleanup() {
  trap - INT TERM EXIT
  echo
  echo "==> stopping the demo"
  NOMAD_ADDR="http://127.0.0.1:$nomad_http" "$bin/nomad" job stop nginx >/dev/null 2>&1 || true
  sleep 2
  for pid in "${pids[@]}"; do kill -INT "$pid" 2>/dev/null || true; done
  wait "${pids[@]}" 2>/dev/null || true
  pkill -P $$ 2>/dev/null || true # the log stream (tail -F never ends)
  pkill -9 -f "$demo/" 2>/dev/null || true # anything the agents left running
  "$root/build/nomad-driver-zeroscale" uninstall "$pin" >/dev/null 2>&1 || true
  grep " $demo/" /proc/self/mounts | awk '{print $2}' | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
  echo "==> done"
}
trap cleanup INT TERM EXIT

echo "==> starting Consul (http 127.0.0.1:$consul_http, dns :$consul_dns)"
"$bin/consul" agent -dev -config-file "$demo/consul.hcl" >"$demo/consul.log" 2>&1 &
pids+=($!)
echo "==> starting Nomad with the zeroscale plugin (http 127.0.0.1:$nomad_http)"
env -u AWS_CA_BUNDLE -u NOMAD_ADDR -u CONSUL_HTTP_ADDR \
  "$bin/nomad" agent -dev -config "$demo/nomad.hcl" >"$demo/nomad.log" 2>&1 &
pids+=($!)

export NOMAD_ADDR="http://127.0.0.1:$nomad_http"
for _ in $(seq 1 120); do
  if "$bin/nomad" node status -self -verbose 2>/dev/null | grep -q "driver.zeroscale.gate *= true"; then
    break
  fi
  sleep 1
done
"$bin/nomad" node status -self -verbose | grep "driver.zeroscale" || {
  echo "the zeroscale driver did not come up; see $demo/nomad.log" >&2
  exit 1
}

echo "==> running examples/jobs/nginx.nomad.hcl (idle_timeout $idle)"
"$bin/nomad" job run -var node=zeroscale-demo -var port="$port" -var idle_timeout="$idle" \
  "$root/examples/jobs/nginx.nomad.hcl" >/dev/null
for _ in $(seq 1 60); do
  curl -fs "http://127.0.0.1:$port/" >/dev/null 2>&1 && break
  sleep 1
done

cat <<EOF

nginx runs at http://127.0.0.1:$port/ and sleeps after $idle without real
traffic (Consul checks it every second; checks do not count).

In another terminal:
  export NOMAD_ADDR=$NOMAD_ADDR
  $bin/nomad job status nginx                 # count 1, then 0 when asleep
  curl -w ' %{time_total}s\n' http://127.0.0.1:$port/   # wakes it; this very request answers
  dig +short -p $consul_dns @127.0.0.1 nginx.service.consul   # resolves while asleep
  $bin/nomad job scaling-events nginx         # sleep, wake and latency events
  curl -s 127.0.0.1:9464/metrics | grep ^zeroscale_

  $root/build/nomad-driver-zeroscale status              # what sleeps, why, idle time left
  $root/build/nomad-driver-zeroscale sleep nginx/nginx   # sleep now
  $root/build/nomad-driver-zeroscale wake nginx/nginx    # wake now, without traffic

Sleep and wake as the plugin logs them (Ctrl-C stops everything):
EOF

tail -n +1 -F "$demo/nomad.log" 2>/dev/null |
  grep --line-buffered -v "\[DEBUG\]" |
  grep --line-buffered -E "parking idle group|group asleep|waking group|group awake|parking undone|invalid|wake failed|not ready" |
  while IFS= read -r line; do
    t="${line#*T}"; t="${t:0:8}"
    msg="${line#*nomad-driver-zeroscale: }"; msg="${msg%%: *}"
    extra=""
    for key in reason from gate_open_after; do
      if [[ "$line" =~ [[:space:]]$key=(\"[^\"]*\"|[^[:space:]]*) ]]; then
        extra+=" $key=${BASH_REMATCH[1]}"
      fi
    done
    echo "  $t  $msg$extra"
  done &
wait
