# Sourced by the scripts that check outputs with Python packages from PyPI:
#   ensure_venv VENV "import x, y" "pkg-spec" ["pkg-spec" ...]
# makes (or reuses) the virtual environment VENV with the packages installed. Where Python
# cannot make a virtual environment or the packages cannot be installed (no network), it says
# "skipped: ..." and exits the calling script with 0.
ensure_venv() {
  local venv="$1" imports="$2"
  shift 2
  if ! command -v python3 >/dev/null; then
    echo "skipped: python3 is not installed"
    exit 0
  fi
  if [ ! -x "$venv/bin/python" ] && ! python3 -m venv "$venv" >/dev/null 2>&1; then
    echo "skipped: python3 cannot make a virtual environment"
    exit 0
  fi
  if ! "$venv/bin/python" -c "$imports" 2>/dev/null; then
    if ! "$venv/bin/pip" install -q "$@" >/dev/null 2>&1; then
      echo "skipped: $* could not be installed (no package index?)"
      exit 0
    fi
  fi
}
