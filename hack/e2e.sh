#!/usr/bin/env bash
# make e2e: the whole product on a throw-away kind cluster.
#   kind cluster -> build both images (CPU worker) -> load them into kind -> helm install the chart
#   -> tests/cluster (apply the CPU sample, kubectl wait Ready, port-forward, official openai client
#   call, an image comes back, delete the service, its children are gone).
# Needs Docker. Not part of `make test`.
#
# Environment:
#   E2E_CLUSTER=image-diffusion-e2e  kind cluster name (reused when it exists)
#   E2E_KEEP_CLUSTER=0               1: leave the cluster running afterwards (to look around)
#   E2E_SKIP_BUILD=0                 1: do not build images (use ones already in the local Docker)
#   KIND_VERSION=v0.33.0             kind installed into .tools/bin with `go install` when missing
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export PATH="$ROOT/.tools/bin:$PATH"

CLUSTER=${E2E_CLUSTER:-image-diffusion-e2e}
KEEP_CLUSTER=${E2E_KEEP_CLUSTER:-0}
SKIP_BUILD=${E2E_SKIP_BUILD:-0}
KIND_VERSION=${KIND_VERSION:-v0.33.0}
RELEASE=image-diffusion-operator
RELEASE_NAMESPACE=diffusion-system
REGISTRY=ghcr.io/image-diffusion-operator
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
OPERATOR_IMAGE=$REGISTRY/operator:$VERSION
WORKER_IMAGE=$REGISTRY/worker:$VERSION-cpu

say() { printf '\n==> %s\n' "$*"; }
die() {
  printf 'make e2e: %s\n' "$*" >&2
  exit 2
}

# --- prerequisites: checked before anything is created ---
command -v docker >/dev/null 2>&1 \
  || die "Docker is required (kind runs the Kubernetes nodes as Docker containers) and no 'docker' command was found. Install Docker and rerun 'make e2e'; nothing was changed. 'make test' needs no Docker."
docker info >/dev/null 2>&1 \
  || die "the Docker engine is not reachable ('docker info' failed): start it (or fix permissions on its socket) and rerun 'make e2e'; nothing was changed."
if ! command -v kind >/dev/null 2>&1; then
  command -v go >/dev/null 2>&1 \
    || die "kind is required and neither 'kind' nor Go (to 'go install sigs.k8s.io/kind@$KIND_VERSION') was found."
  say "installing kind $KIND_VERSION into .tools/bin"
  mkdir -p "$ROOT/.tools/bin"
  GOBIN="$ROOT/.tools/bin" go install "sigs.k8s.io/kind@$KIND_VERSION"
fi
make tools >/dev/null
PY=$ROOT/.venv/bin/python

# A kubeconfig of our own: the user's current context is never touched.
KUBECONFIG_FILE=$(mktemp -t e2e-kubeconfig.XXXXXX)
export KUBECONFIG=$KUBECONFIG_FILE

diagnostics() {
  say "diagnostics"
  kubectl get nodes -o wide || true
  kubectl get imagediffusionservices,deployments,services,persistentvolumeclaims,pods -A -o wide || true
  kubectl describe imagediffusionservices -A || true
  kubectl -n "$RELEASE_NAMESPACE" logs "deployment/$RELEASE" --tail=200 || true
  kubectl get events -A --sort-by=.lastTimestamp | tail -50 || true
}

finish() {
  local status=$?
  if [[ $status -ne 0 ]]; then
    diagnostics
  fi
  if [[ $KEEP_CLUSTER == 1 ]]; then
    say "cluster kept: export KUBECONFIG=$KUBECONFIG_FILE (delete with: kind delete cluster --name $CLUSTER)"
  else
    say "deleting kind cluster $CLUSTER"
    kind delete cluster --name "$CLUSTER" || true
    rm -f "$KUBECONFIG_FILE"
  fi
  if [[ $status -eq 0 ]]; then say "e2e passed"; else say "e2e FAILED (exit $status)"; fi
  exit "$status"
}
trap finish EXIT

say "kind cluster $CLUSTER"
if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  kind get kubeconfig --name "$CLUSTER" >"$KUBECONFIG_FILE"
else
  kind create cluster --name "$CLUSTER" --kubeconfig "$KUBECONFIG_FILE" --wait 180s
fi
kubectl cluster-info

if [[ $SKIP_BUILD != 1 ]]; then
  say "building $OPERATOR_IMAGE and $WORKER_IMAGE"
  make images WORKER_VARIANT=cpu
fi
say "loading the images into kind"
kind load docker-image --name "$CLUSTER" "$OPERATOR_IMAGE" "$WORKER_IMAGE"

say "helm install $RELEASE"
helm upgrade --install "$RELEASE" helm/image-diffusion-operator \
  --namespace "$RELEASE_NAMESPACE" --create-namespace \
  --set "worker.image.tag=$VERSION-cpu" \
  --set operator.logFormat=plain \
  --wait --timeout 5m
kubectl -n "$RELEASE_NAMESPACE" rollout status "deployment/$RELEASE" --timeout=180s
kubectl get crd imagediffusionservices.imagediffusion.dev

say "cluster tests: CPU sample -> Ready -> openai client -> image -> delete -> children gone"
E2E_OPERATOR_NAMESPACE=$RELEASE_NAMESPACE E2E_OPERATOR_DEPLOYMENT=$RELEASE \
  "$PY" -m pytest -m cluster tests/cluster/test_e2e_kind.py -p no:cacheprovider -v
