#!/usr/bin/env bash
# make e2e: the whole product on a throw-away kind cluster.
#   kind cluster -> build both images (CPU worker) -> load them into kind -> helm install the chart
#   -> tests/cluster (apply the CPU sample, kubectl wait Ready, port-forward, official openai client
#   call, an image comes back, delete the service, its children are gone; and the CRD's admission
#   rules against the real API server).
# Needs Docker. Not part of `make test`.
#
# Environment:
#   E2E_CLUSTER=image-diffusion-e2e  kind cluster name (reused when it exists, and then never deleted)
#   E2E_KEEP_CLUSTER=0               1: leave the cluster this run created running afterwards
#   E2E_SKIP_BUILD=0                 1: do not build images (use ones already in the local Docker)
#   KIND_VERSION=v0.33.0             kind installed into .tools/bin with `go install` when missing
#   IMAGE_REGISTRY=ghcr.io/image-diffusion-operator  registry part of the image names (as in the Makefile)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
# Appended, not prepended: the user's own helm and kubectl (matching their machine and cluster) win;
# .tools/bin only fills in what is missing (on Linux x86_64 `make tools` downloads both there).
export PATH="$PATH:$ROOT/.tools/bin"

CLUSTER=${E2E_CLUSTER:-image-diffusion-e2e}
KEEP_CLUSTER=${E2E_KEEP_CLUSTER:-0}
SKIP_BUILD=${E2E_SKIP_BUILD:-0}
KIND_VERSION=${KIND_VERSION:-v0.33.0}
RELEASE=image-diffusion-operator
RELEASE_NAMESPACE=diffusion-system
REGISTRY=${IMAGE_REGISTRY:-ghcr.io/image-diffusion-operator}
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

CREATED_CLUSTER=0
finish() {
  local status=$?
  if [[ $status -ne 0 ]]; then
    diagnostics
  fi
  if [[ $CREATED_CLUSTER != 1 ]]; then
    # Someone else's cluster (or an earlier run's, kept): not ours to delete.
    say "cluster $CLUSTER was there before this run: left running (kubeconfig: kind get kubeconfig --name $CLUSTER)"
    rm -f "$KUBECONFIG_FILE"
  elif [[ $KEEP_CLUSTER == 1 ]]; then
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
  # Set before creating: a half-made cluster is ours to clean up too.
  CREATED_CLUSTER=1
  kind create cluster --name "$CLUSTER" --kubeconfig "$KUBECONFIG_FILE" --wait 180s
fi
kubectl cluster-info

if [[ $SKIP_BUILD != 1 ]]; then
  say "building $OPERATOR_IMAGE and $WORKER_IMAGE"
  make images WORKER_VARIANT=cpu IMAGE_REGISTRY="$REGISTRY"
fi
say "loading the images into kind"
kind load docker-image --name "$CLUSTER" "$OPERATOR_IMAGE" "$WORKER_IMAGE"

say "helm install $RELEASE"
helm upgrade --install "$RELEASE" helm/image-diffusion-operator \
  --namespace "$RELEASE_NAMESPACE" --create-namespace \
  --set "operator.image.repository=$REGISTRY/operator" \
  --set "operator.image.tag=$VERSION" \
  --set "worker.image.repository=$REGISTRY/worker" \
  --set "worker.image.tag=$VERSION-cpu" \
  --set operator.logFormat=plain \
  --wait --timeout 5m
# On a reused cluster the images were reloaded under the same tags, so helm rendered the same
# Deployment and left the old operator pod running the old image: restart it onto the new one.
kubectl -n "$RELEASE_NAMESPACE" rollout restart "deployment/$RELEASE"
kubectl -n "$RELEASE_NAMESPACE" rollout status "deployment/$RELEASE" --timeout=180s
kubectl get crd imagediffusionservices.imagediffusion.dev

say "cluster tests: CPU sample -> Ready -> openai client -> image -> delete -> children gone; CRD admission"
# Only the admission tests from test_cluster_operator.py: the rest start a second operator in this
# process, which would race the chart's operator for the same services.
# E2E_REQUIRE_CLUSTER=1: a skip in tests/cluster (no cluster, no CRD, no kubectl) fails the run
# instead of passing it with nothing tested.
E2E_REQUIRE_CLUSTER=1 E2E_OPERATOR_NAMESPACE=$RELEASE_NAMESPACE E2E_OPERATOR_DEPLOYMENT=$RELEASE \
  "$PY" -m pytest -m cluster -p no:cacheprovider -v \
  tests/cluster/test_e2e_kind.py tests/cluster/operator/test_cluster_operator.py \
  -k 'test_e2e_kind or test_the_server_admits_each_sample or test_the_server_rejects_bad_specs'
