#!/usr/bin/env bash
# Prepare everything the README's commands need, idempotently:
#   1. the venv .venv (Python 3.11+), created once;
#   2. the Python packages of requirements-dev.txt, installed again only when that file changes;
#   3. the Rust extension sparktorch._native, built in release mode into the venv (cargo makes
#      the rebuild incremental: a second run with no Rust change takes seconds);
#   4. the `sparktorch-ps` command on the venv's PATH (as `pip install .` puts it there).
# The older PySpark lines of the compatibility suite are scripts/setup_compat.sh's (`make
# test-compat`): `make example` needs none of them.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi

stamp="$VENV/.requirements.sha256"
want=$(sha256sum requirements-dev.txt | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing Python packages (requirements-dev.txt)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -r requirements-dev.txt
  echo "$want" > "$stamp"
fi

# Build the extension only when a Rust or build file is newer than the installed module. It is
# built against the stable ABI (PyO3's abi3-py311), so its file is _native.abi3.so; a
# version-tagged _native.cpython-*.so left by an older build would shadow it (Python tries that
# suffix first), so it is removed.
so=python/sparktorch/_native.abi3.so
if [ ! -f "$so" ] || [ -n "$(find crates Cargo.toml Cargo.lock pyproject.toml -newer "$so" -type f 2>/dev/null | head -n1)" ]; then
  echo "setup: building the Rust extension (release)"
  VIRTUAL_ENV="$PWD/$VENV" PATH="$PWD/$VENV/bin:$PATH" \
    "$VENV/bin/maturin" develop --release -q --skip-install 2>&1 | grep -v '^📦\|^🔗\|^🐍\|^⚠️  Warning: .* use-pep517' || true
  [ -f "$so" ] || { echo "setup: the extension did not build ($so is missing)" >&2; exit 1; }
  touch "$so"
fi
rm -f python/sparktorch/_native.cpython-*.so

# The package itself is found through a .pth file pointing at python/ (an editable install
# without pip's overhead); written once.
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$PWD/python" > "$site/sparktorch-dev.pth"

# The console script that `pip install .` makes from [project.scripts], written the same way.
printf '#!%s\nimport sys\nfrom sparktorch.cli import main\nsys.exit(main())\n' "$PWD/$VENV/bin/python" > "$VENV/bin/sparktorch-ps"
chmod +x "$VENV/bin/sparktorch-ps"
