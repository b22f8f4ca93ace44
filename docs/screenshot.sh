#!/usr/bin/env bash
# The README's picture of the run report (docs/report.png): the report of RUN_DIR, opened
# in headless Chromium (Debian: apt-get install -y chromium), shrunk to stay small.
#
#   docs/screenshot.sh RUN_DIR [OUT_PNG]      # OUT_PNG defaults to docs/report.png
set -euo pipefail
if [[ $# -lt 1 || $# -gt 2 || ! -d $1 ]]; then
    echo "usage: docs/screenshot.sh RUN_DIR [OUT_PNG] (RUN_DIR: a run folder, run.dir)" >&2
    exit 2
fi
if ! command -v chromium > /dev/null; then
    echo "screenshot: needs chromium on PATH (Debian: apt-get install -y chromium)" >&2
    exit 2
fi
run_dir=$1
out=${2:-$(dirname "$0")/report.png}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

python -m longtrain.reporting "$run_dir" --out "$work/report"   # a copy: the run folder is left as it is
# Offline and quiet: no network, no first-run UI, a throwaway profile.
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --user-data-dir="$work/profile" --hide-scrollbars --window-size=1400,3200 \
    --screenshot="$work/full.png" "file://$work/report/report.html" 2> "$work/chromium.log" \
    || { cat "$work/chromium.log" >&2; exit 1; }
python - "$work/full.png" "$out" <<'PY'
import sys
from PIL import Image, ImageOps

# The window is taller than the page: cut the white below it. Half-size would blur the
# cell labels: 1000 px wide, a 256-colour palette, under 500 KB.
image = Image.open(sys.argv[1]).convert("RGB")
bottom = ImageOps.invert(image).getbbox()[3]
image = image.crop((0, 0, image.width, min(image.height, bottom + 30)))
image = image.resize((1000, round(image.height * 1000 / image.width)), Image.LANCZOS)
image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(sys.argv[2], optimize=True)
PY
echo "wrote $out ($(($(stat -c %s "$out") / 1024)) KB)"
