#!/usr/bin/env bash
# Build the std-daq-service image of one version of the project:
#   build_std-daq-service.sh VERSION [BASE_TAG]
# VERSION is any git revision (a tag such as v0.1.0, a branch, a commit); the image is tagged with it.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
version="${1:?usage: build_std-daq-service.sh VERSION [BASE_TAG]}"
base_tag="${2:-latest}"
cd "${here}/.."
git rev-parse --verify --quiet "${version}^{commit}" >/dev/null || {
  echo "build_std-daq-service.sh: ${version} is not a git revision of this repository" >&2
  exit 2
}
git archive --format=tar "${version}" | docker build \
  --build-arg "BASE_IMAGE=std-daq-service-base:${base_tag}" \
  --build-arg "STD_DAQ_VERSION=${version}" \
  -f docker/std-daq-service/Dockerfile \
  -t "std-daq-service:${version}" -
