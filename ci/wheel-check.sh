#!/usr/bin/env bash
# Build the wheel, install it into a fresh virtual environment, and from outside the source
# tree import every package of the source tree and run the main job: what a user installing
# from a package index gets, which an editable install cannot show.
set -euo pipefail
src="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python -m pip wheel --no-deps -q -w "$work/dist" "$src"
python -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q "$work"/dist/gpumpiad-*.whl
# Every folder of the source tree holding an __init__.py is a package the wheel must carry.
packages=$(cd "$src" && find gpumpiad -name __init__.py -printf '%h\n' | tr / . | sort)
packages="$packages gpumpiad.kernels"
cd "$work"
PATH="$work/venv/bin:$PATH"
python - $packages <<'PY'
import importlib, os, sys
import gpumpiad
assert os.path.realpath(gpumpiad.__file__).startswith(os.path.realpath(sys.prefix)), gpumpiad.__file__
for name in sys.argv[1:]:
    importlib.import_module(name)
from importlib.resources import files
for name in ("heat.cu", "heat3d.cu", "host_cuda.h"):
    assert files("gpumpiad.kernels").joinpath(name).is_file(), f"kernels/{name} not in the wheel"
print(f"wheel check: gpumpiad {gpumpiad.__version__} from {os.path.dirname(gpumpiad.__file__)}; "
      f"imported {len(sys.argv) - 1} packages")
PY
gpumpiad --version
mpiexec -n 2 gpumpiad heat-inverse --out "$work/out"
test -s "$work/out/summary.json"
echo "wheel check: main job ran from the installed wheel"
