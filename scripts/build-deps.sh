#!/usr/bin/env bash
# Builds pinned Nomad and Consul binaries from the Go module proxy into .bin/.
# The release modules carry `replace ./sub` lines whose targets are not in the
# module zip, so each build drops them and pins the published sub-modules.
set -euo pipefail

NOMAD_VERSION="${NOMAD_VERSION:-v1.11.1}"
NOMAD_API_VERSION="${NOMAD_API_VERSION:-v0.0.0-20251216171439-1dee0671280e}"
CONSUL_VERSION="${CONSUL_VERSION:-v1.22.3}"

root="$(cd "$(dirname "$0")/.." && pwd)"
bin="$root/.bin"
work="$root/.bin/src"
mkdir -p "$bin" "$work"
export GONOSUMDB="github.com/hashicorp/consul,${GONOSUMDB:-}"
export GOFLAGS="-mod=mod -buildvcs=false"

stamp_ok() { # binary, version
  [ -x "$bin/$1" ] && [ "$(cat "$bin/.$1.version" 2>/dev/null)" = "$2" ]
}

fetch_module() { # module@version → prints a writable copy's path
  local dir dest
  dir="$(go mod download -json "$1" | sed -n 's/.*"Dir": "\(.*\)",/\1/p')"
  [ -n "$dir" ] || { echo "build-deps: cannot download $1" >&2; exit 1; }
  dest="$work/$(echo "$1" | tr '/@' '__')"
  rm -rf "$dest"
  cp -r "$dir" "$dest"
  chmod -R u+w "$dest"
  echo "$dest"
}

build_nomad() {
  if stamp_ok nomad "$NOMAD_VERSION"; then echo "build-deps: nomad $NOMAD_VERSION already built"; return; fi
  echo "build-deps: building nomad $NOMAD_VERSION (takes minutes)"
  local src
  src="$(fetch_module "github.com/hashicorp/nomad@$NOMAD_VERSION")"
  (cd "$src" &&
    go mod edit -dropreplace github.com/hashicorp/nomad/api \
      -require "github.com/hashicorp/nomad/api@$NOMAD_API_VERSION" &&
    go build -trimpath -o "$bin/nomad" .)
  echo "$NOMAD_VERSION" >"$bin/.nomad.version"
}

build_consul() {
  if stamp_ok consul "$CONSUL_VERSION"; then echo "build-deps: consul $CONSUL_VERSION already built"; return; fi
  echo "build-deps: building consul $CONSUL_VERSION (takes minutes)"
  local src sub
  src="$(fetch_module "github.com/hashicorp/consul@$CONSUL_VERSION")"
  (cd "$src" &&
    for sub in api envoyextensions proto-public sdk troubleshoot; do
      go mod edit -dropreplace "github.com/hashicorp/consul/$sub"
    done &&
    go build -trimpath -o "$bin/consul" .)
  echo "$CONSUL_VERSION" >"$bin/.consul.version"
}

case "${1:-all}" in
  nomad) build_nomad ;;
  consul) build_consul ;;
  all) build_nomad; build_consul ;;
  *) echo "usage: $0 [nomad|consul|all]" >&2; exit 2 ;;
esac
rm -rf "$work"
