#!/usr/bin/env bash
# Set up everything the tests need from nothing, then run the whole suite.
#   Debian packages (as root, when missing): prometheus (+ promtool), buildah, podman,
#   debootstrap, openssh-server, rsync (the Ray cluster launcher's file sync); a
#   virtual environment .venv made from the system
#   Python with the package and its test extras; then pytest over tests/.
# With CI=true a test that would skip for a missing tool fails instead.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
for pair in prometheus:prometheus promtool:prometheus buildah:buildah podman:podman \
            debootstrap:debootstrap sshd:openssh-server runc:runc rsync:rsync; do
  tool=${pair%%:*}; pkg=${pair##*:}
  if ! command -v "$tool" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$tool" ]; then
    need_apt+=("$pkg")
  fi
done
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "installing Debian packages: ${need_apt[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      $(printf '%s\n' "${need_apt[@]}" | sort -u) >/dev/null
  else
    echo "warning: not root; cannot install ${need_apt[*]} (tests needing them will skip)" >&2
  fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[test]'
# The venv's console scripts (ray, mpiexec from the mpich wheel, hadolint) come first.
export PATH="$PWD/.venv/bin:$PATH"
ruff check distbackprop tests deploy examples
exec python -m pytest tests "$@"
