#!/usr/bin/env bash
# Render or apply an overlay of deploy/k8s after checking that the keys exist:
#   bash deploy/render.sh cpu|gpu|gpu-two-models   # print the manifests (kubectl kustomize)
#   bash deploy/render.sh cpu|gpu apply      # kubectl apply -k
# The Secret comes from deploy/k8s/base/secrets.env, which deploy/make-secrets.sh writes; without it kustomize
# would stop with a bare "evalsymlink failure" on the missing file.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
overlay=${1:?usage: deploy/render.sh cpu|gpu|gpu-two-models [apply]}
if [ ! -d "$here/k8s/overlays/$overlay" ]; then
  echo "no overlay '$overlay' (choose cpu, gpu or gpu-two-models)" >&2
  exit 2
fi
if [ ! -f "$here/k8s/base/secrets.env" ]; then
  echo "deploy/k8s/base/secrets.env is missing: run deploy/make-secrets.sh first (it writes fresh API keys and" \
       "the Redis password; nothing is rendered without them)" >&2
  exit 1
fi
if [ "${2:-}" = apply ]; then
  exec kubectl apply -k "$here/k8s/overlays/$overlay"
fi
exec kubectl kustomize "$here/k8s/overlays/$overlay"
