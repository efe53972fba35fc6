#!/usr/bin/env bash
# Builds the local Kubernetes test toolchain from Go modules at pinned versions:
# kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, etcd, kwok
# and helm. Binaries go to a cache outside the repository keyed by the versions,
# so a second run (or a second checkout) reuses them. No Docker, no downloads
# other than Go modules through the configured GOPROXY.
#
#   hack/cluster-tools.sh                 build whatever is missing (idempotent)
#   hack/cluster-tools.sh --print-bin-dir print the bin directory, build nothing
#   hack/cluster-tools.sh --check         exit 0 if every tool is built, else 1
#
# Environment: HEADWAY_TOOLS_CACHE (default ~/.cache/headway-cluster-tools),
# HEADWAY_K8S_VERSION, HEADWAY_ETCD_VERSION, HEADWAY_KWOK_VERSION,
# HEADWAY_HELM_VERSION override the pins below.
set -euo pipefail

K8S_VERSION="${HEADWAY_K8S_VERSION:-1.36.3}"
ETCD_VERSION="${HEADWAY_ETCD_VERSION:-3.6.17}"
KWOK_VERSION="${HEADWAY_KWOK_VERSION:-0.8.0}"
HELM_VERSION="${HEADWAY_HELM_VERSION:-4.3.2}"

CACHE_ROOT="${HEADWAY_TOOLS_CACHE:-$HOME/.cache/headway-cluster-tools}"
KEY="k8s-v${K8S_VERSION}-etcd-v${ETCD_VERSION}-kwok-v${KWOK_VERSION}-helm-v${HELM_VERSION}"
ROOT="$CACHE_ROOT/$KEY"
BIN="$ROOT/bin"
STAMPS="$ROOT/stamps"
SHARE="$ROOT/share"

TOOLS=(etcd kube-apiserver kubectl kwok kube-controller-manager kube-scheduler helm)

case "${1:-}" in
  --print-bin-dir) echo "$BIN"; exit 0 ;;
  --check)
    for t in "${TOOLS[@]}"; do [[ -f "$STAMPS/$t" && -x "$BIN/$t" ]] || exit 1; done
    exit 0 ;;
  "") ;;
  *) echo "usage: $0 [--print-bin-dir|--check]" >&2; exit 2 ;;
esac

# Fail instead of silently fetching another toolchain; build static binaries
# like upstream does for the control plane.
export GOTOOLCHAIN=local CGO_ENABLED=0
export GOFLAGS="${GOFLAGS:-} -buildvcs=false"
mkdir -p "$BIN" "$STAMPS" "$SHARE"

START_ALL=$(date +%s)
log() { printf '[cluster-tools %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
die() { printf '[cluster-tools] ERROR: %s\n' "$*" >&2; exit 1; }
# One go command at a time, at low priority, so the machine stays usable.
gorun() { nice -n 10 go "$@"; }

need_go() {
  command -v go >/dev/null || die "go not found in PATH (Go >= 1.26 is required)"
}

# Refuse early, with the module name, when the proxy does not serve a module.
require_served() {
  local mod="$1" out
  if ! out=$(gorun mod download -json "$mod" 2>&1); then
    die "module $mod is not served by GOPROXY=$(go env GOPROXY):
$out
Try another patch release via HEADWAY_*_VERSION (see docs/development.md)."
  fi
  printf '%s\n' "$out"
}

is_done() { [[ -f "$STAMPS/$1" && -x "$BIN/$1" ]]; }

stamp() {
  local tool="$1" secs="$2" version="$3"
  printf 'tool=%s\nversion=%s\nbuild_seconds=%s\nbuilt_at=%s\ngo=%s\n' \
    "$tool" "$version" "$secs" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$(go env GOVERSION)" \
    > "$STAMPS/$tool"
  log "built $tool $version in ${secs}s"
}

# --- etcd: server/go.mod has local replaces, so build via a wrapper module ----
build_etcd() {
  is_done etcd && { log "etcd: up to date"; return; }
  local t0 w="$ROOT/work/etcd"; t0=$(date +%s)
  log "etcd v$ETCD_VERSION: resolving"
  mkdir -p "$w" && cd "$w"
  [[ -f go.mod ]] || go mod init local.invalid/etcd-bin >/dev/null 2>&1
  require_served "go.etcd.io/etcd/server/v3@v$ETCD_VERSION" >/dev/null
  gorun get -tool "go.etcd.io/etcd/server/v3@v$ETCD_VERSION"
  log "etcd: compiling"
  gorun build -trimpath -ldflags "-s -w" -o "$BIN/etcd" go.etcd.io/etcd/server/v3
  stamp etcd $(( $(date +%s) - t0 )) "v$ETCD_VERSION"
}

# --- Kubernetes: wrapper module, staging replaces generated from its go.mod ---
K8S_DIR="$ROOT/work/k8s"

prepare_k8s() {
  [[ -f "$K8S_DIR/.prepared" ]] && return
  local t0 gomod staging modules m; t0=$(date +%s)
  staging="v0.${K8S_VERSION#1.}"
  log "kubernetes v$K8S_VERSION: resolving (staging modules at $staging)"
  mkdir -p "$K8S_DIR" && cd "$K8S_DIR"
  rm -f go.mod go.sum
  go mod init local.invalid/k8s-bins >/dev/null 2>&1
  gomod=$(require_served "k8s.io/kubernetes@v$K8S_VERSION" \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')

  # Every module k8s.io/kubernetes maps to ./staging/... is published at v0.X.Y;
  # take the list from this exact release instead of hard-coding it.
  modules=$(go mod edit -json "$gomod" | python3 -c '
import json, sys
for r in json.load(sys.stdin).get("Replace") or []:
    if r["New"]["Path"].startswith("./staging/"):
        print(r["Old"]["Path"])')
  [[ -n "$modules" ]] || die "no staging replace lines found in $gomod"
  for m in $modules; do
    go mod edit -replace="$m=$m@$staging"
  done
  log "kubernetes: $(wc -w <<<"$modules") staging modules replaced at $staging"

  # Same GODEBUG defaults as the official build.
  local godebug
  godebug=$(go mod edit -json "$gomod" | python3 -c '
import json, sys
for g in json.load(sys.stdin).get("Godebug") or []:
    print(g["Key"] + "=" + g["Value"])')
  for g in $godebug; do go mod edit -godebug="$g"; done

  gorun get -tool \
    "k8s.io/kubernetes/cmd/kube-apiserver@v$K8S_VERSION" \
    "k8s.io/kubernetes/cmd/kube-controller-manager@v$K8S_VERSION" \
    "k8s.io/kubernetes/cmd/kube-scheduler@v$K8S_VERSION" \
    "k8s.io/kubernetes/cmd/kubectl@v$K8S_VERSION" \
    || die "resolving k8s.io/kubernetes v$K8S_VERSION failed (a module is not served?);
try HEADWAY_K8S_VERSION=1.36.1 or 1.37.2"
  touch .prepared
  log "kubernetes: resolved in $(( $(date +%s) - t0 ))s"
}

k8s_ldflags() {
  local minor build_date ldf p
  minor=$(cut -d. -f2 <<<"$K8S_VERSION")
  build_date=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  ldf="-s -w"
  # What hack/lib/version.sh sets, so /version and kubectl report the release.
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldf+=" -X $p.gitVersion=v$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor"
    ldf+=" -X $p.gitTreeState=clean -X $p.buildDate=$build_date"
  done
  printf '%s' "$ldf"
}

build_k8s() {
  local tool="$1" t0
  is_done "$tool" && { log "$tool: up to date"; return; }
  t0=$(date +%s)
  prepare_k8s
  cd "$K8S_DIR"
  log "$tool: compiling"
  gorun build -trimpath -tags selinux,notest,grpcnotrace -ldflags "$(k8s_ldflags)" \
    -o "$BIN/$tool" "k8s.io/kubernetes/cmd/$tool"
  stamp "$tool" $(( $(date +%s) - t0 )) "v$K8S_VERSION"
}

# --- kwok: plain module; also collect its default Stages (standalone kwok
# refuses to start without them) ---------------------------------------------
build_kwok() {
  is_done kwok && [[ -f "$SHARE/kwok-stages.yaml" ]] && { log "kwok: up to date"; return; }
  local t0 w="$ROOT/work/kwok" dir f; t0=$(date +%s)
  log "kwok v$KWOK_VERSION: resolving"
  mkdir -p "$w" && cd "$w"
  [[ -f go.mod ]] || go mod init local.invalid/kwok-bin >/dev/null 2>&1
  dir=$(require_served "sigs.k8s.io/kwok@v$KWOK_VERSION" \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')
  gorun get -tool "sigs.k8s.io/kwok/cmd/kwok@v$KWOK_VERSION"
  log "kwok: compiling"
  gorun build -trimpath -ldflags "-s -w" -o "$BIN/kwok" sigs.k8s.io/kwok/cmd/kwok
  {
    for f in node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
             pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
      [[ -f "$dir/kustomize/stage/$f" ]] || die "kwok stage $f missing in $dir"
      echo "---"; cat "$dir/kustomize/stage/$f"
    done
  } > "$SHARE/kwok-stages.yaml"
  stamp kwok $(( $(date +%s) - t0 )) "v$KWOK_VERSION"
}

# --- helm v4: plain module ---------------------------------------------------
build_helm() {
  is_done helm && { log "helm: up to date"; return; }
  local t0 w="$ROOT/work/helm"; t0=$(date +%s)
  log "helm v$HELM_VERSION: resolving"
  mkdir -p "$w" && cd "$w"
  [[ -f go.mod ]] || go mod init local.invalid/helm-bin >/dev/null 2>&1
  require_served "helm.sh/helm/v4@v$HELM_VERSION" >/dev/null
  gorun get -tool "helm.sh/helm/v4/cmd/helm@v$HELM_VERSION"
  log "helm: compiling"
  gorun build -trimpath -ldflags "-s -w -X helm.sh/helm/v4/internal/version.version=v$HELM_VERSION" \
    -o "$BIN/helm" helm.sh/helm/v4/cmd/helm
  stamp helm $(( $(date +%s) - t0 )) "v$HELM_VERSION"
}

need_go
log "cache $ROOT ($(go env GOVERSION), GOPROXY=$(go env GOPROXY))"
build_etcd
build_k8s kube-apiserver
build_k8s kubectl
build_kwok
build_k8s kube-controller-manager
build_k8s kube-scheduler
build_helm

"$BIN/kube-apiserver" --version
log "all tools ready in $(( $(date +%s) - START_ALL ))s; bin directory:"
echo "$BIN"
