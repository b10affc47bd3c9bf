#!/usr/bin/env bash
# Build the std-daq-service-base image (Python + dependencies): build_std-daq-service-base.sh [TAG]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
tag="${1:-latest}"
docker build -t "std-daq-service-base:${tag}" "${here}/std-daq-service-base"
