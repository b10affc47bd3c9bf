#!/usr/bin/env bash
# Build the std-daq-service image of the project:
#   build_std-daq-service.sh                        the checked-out tree, as it is
#   build_std-daq-service.sh REVISION [BASE_TAG]    exactly that git revision (a tag, a branch, a commit)
#   build_std-daq-service.sh "" BASE_TAG            the checked-out tree on another base image
# The checked-out tree is what `git ls-files` sees: tracked files with their uncommitted changes and new
# files, without what .gitignore excludes (.venv, build output, data). Its image is tagged with
# `git describe --tags --always --dirty` (e.g. e03d6bc-dirty), a revision's with the revision's name ('/'
# becomes '-'). The last line printed is the tag; docker/docker-compose.yml runs it as STD_DAQ_VERSION.
# Why the tree by default: the repository may have no tags at all, and the first image a newcomer builds
# is of what they have checked out.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
revision="${1:-}"
base_tag="${2:-latest}"
cd "${here}/.."
git rev-parse --git-dir >/dev/null 2>&1 || {
  echo "build_std-daq-service.sh: $(pwd) is not a git checkout; the image is built from one" >&2
  exit 2
}

if [[ -n "${revision}" ]]; then
  git rev-parse --verify --quiet "${revision}^{commit}" >/dev/null || {
    echo "build_std-daq-service.sh: ${revision} is not a git revision of this repository" \
      "(git tag and git log list them; without an argument the checked-out tree is built)" >&2
    exit 2
  }
  tag="${revision//\//-}"
  build_context() { git archive --format=tar "${revision}"; }
else
  tag="$(git describe --tags --always --dirty)"
  # Files deleted in the tree but still tracked are left out (tar would fail on them).
  build_context() {
    git ls-files -z --cached --others --exclude-standard |
      while IFS= read -r -d '' path; do
        if [[ -e "${path}" || -L "${path}" ]]; then printf '%s\0' "${path}"; fi
      done |
      tar --create --file=- --null --no-recursion --files-from=-
  }
fi

build_context | docker build \
  --build-arg "BASE_IMAGE=std-daq-service-base:${base_tag}" \
  --build-arg "STD_DAQ_VERSION=${tag}" \
  -f docker/std-daq-service/Dockerfile \
  -t "std-daq-service:${tag}" -
echo "built std-daq-service:${tag}; run it with: STD_DAQ_VERSION=${tag} docker compose -f docker/docker-compose.yml up"
echo "${tag}"
