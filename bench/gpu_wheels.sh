#!/usr/bin/env bash
# Wheels the GPU machine lacks, downloaded on a machine with PyPI access into the repository's
# gitignored .whl/ folder, and the one device command that installs them and runs
# bench/gpu_suite.py.
#
# The GPU machine has Python 3.12 on x86-64 and no network. Its image has torch,
# transformers, accelerate, safetensors, huggingface_hub, tokenizers, numpy, pillow, tqdm and
# scikit-learn, but not diffusers. The wheels here are pure Python; the platform tags are
# those the device notes prescribe, so a compiled wheel added later resolves the same way.
#
# Usage:
#   bench/gpu_wheels.sh           download into .whl/, check the requirements, print the command
#   bench/gpu_wheels.sh --print   print the command only
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

# Missing there; pinned to the versions the tests pass with here. diffusers declares
# importlib_metadata (it imports it only on Python < 3.8); 8.7.0 needs nothing but zipp.
WHEELS=(diffusers==0.42.1 importlib_metadata==8.7.0)
# The other requirements of those wheels, all in the GPU machine's image.
PRESENT=(filelock huggingface-hub numpy pillow regex requests safetensors typing-extensions zipp)
# The suite's core budget and the device command's limit: budget + a part's hard-stop margin
# (1.25x) + imports and the wheel install. Start (~1.5 min) + this + transfers leaves about
# 4.5 of the 15 device minutes for a rerun of failed parts on the still-warm machine.
BUDGET_S=420
TIMEOUT_S=510

print_command() {
  cat <<EOF
Device run, one call: carry [".whl"], timeout_s ${TIMEOUT_S}, command:

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; set -o pipefail; PYTHONUNBUFFERED=1 python3 bench/gpu_suite.py --out "\$OUT" --budget-s ${BUDGET_S} 2>&1 | tee "\$OUT/gpu_suite.log"

It brings back gpu_suite.json, gpu_suite.log, RESULTS.md and the RESULTS_*.md files it
measured for; copy them into bench/ (the JSON as bench/gpu_suite.json). Parts that failed
or timed out are named at the end of the log: rerun them at once on the warm machine with
the same command plus --only PART,PART and a smaller --budget-s and timeout_s.
The training recipe on the GPU is one more part, run alone in what is left (it is skipped
with a note where the recipe takes no --device): --only train --budget-s 200
--part-budget train=180 --train-args="RECIPE OPTIONS", timeout_s 240.
EOF
}

if [[ "${1:-}" == "--print" ]]; then
  print_command
  exit 0
fi

if ! git check-ignore -q .whl/x.whl; then
  echo "error: .whl/ is not ignored by git; add /.whl/ to .gitignore or .git/info/exclude" >&2
  exit 1
fi
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"

# One version of each wheel (two stop the whole install there), and every requirement either
# carried or in the image.
python3 - "${#WHEELS[@]}" "${WHEELS[@]}" "${PRESENT[@]}" <<'PY'
import re
import sys
import zipfile
from pathlib import Path

from packaging.requirements import Requirement

n = int(sys.argv[1])
wanted = [w.split("==")[0] for w in sys.argv[2 : 2 + n]]
present = sys.argv[2 + n :]
# The GPU machine's interpreter, for the requirements' environment markers.
THERE = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
         "platform_machine": "x86_64", "implementation_name": "cpython", "extra": ""}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


wheels = sorted(Path(".whl").glob("*.whl"))
names = [norm(w.name.split("-")[0]) for w in wheels]
extra = sorted({n for n in names if n not in map(norm, wanted)})
doubles = sorted({n for n in names if names.count(n) > 1})
if extra or doubles:
    sys.exit(f"error: .whl/ holds other wheels {extra} or two versions of {doubles}; empty it")
known = {norm(x) for x in wanted + present}
missing = []
for wheel in wheels:
    with zipfile.ZipFile(wheel) as z:
        meta = next(p for p in z.namelist() if p.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    for line in lines:
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            needed = req.marker is None or req.marker.evaluate(THERE)
            if needed and norm(req.name) not in known:
                missing.append(f"{wheel.name}: {req}")
if missing:
    sys.exit("error: requirements neither carried nor in the image:\n  " + "\n  ".join(missing))
size = sum(w.stat().st_size for w in wheels) / 2**20
print(f"{len(wheels)} wheels in .whl/ ({size:.1f} MiB): " + ", ".join(w.name for w in wheels))
PY
print_command
