"""The report of a run folder or a sweep folder, finished or not.

    python -m longtrain.reporting RUN_DIR [--out DIR]      # the run report (run_report.py)
    python -m longtrain.reporting SWEEP_DIR [--out DIR]    # a train.py -m folder: one row per job (sweep_report.py)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from longtrain.reporting.run_report import ReportError, is_run_folder, write_run_report
from longtrain.reporting.sweep_report import read_sweep, write_sweep_report
from longtrain.run_dir import GATE_FILE, METRICS_FILE


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m longtrain.reporting", description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path, help="a run folder (run.dir) or a sweep folder (train.py -m)")
    p.add_argument("--out", type=Path, help="where report.html, report.md and report/ go (default: the folder)")
    args = p.parse_args(argv)
    folder: Path = args.folder
    try:
        if not folder.is_dir():
            raise ReportError(f"{folder} is not a folder; give a run folder (run.dir) or a sweep folder (train.py -m)")
        sweep = read_sweep(folder)
        if sweep.rows:
            written = write_sweep_report(sweep, args.out)
            print(written.md.read_text(), flush=True)
        elif is_run_folder(folder):
            written = write_run_report(folder, args.out)
        else:
            raise ReportError(f"{folder} holds neither stage folders (STAGE/{METRICS_FILE}, {GATE_FILE} or config.yaml, "
                              "written by train.py) nor sweep jobs (N/job.json, written by train.py -m)")
    except ReportError as e:
        print(f"report: {e}", file=sys.stderr)
        return 2
    print(f"wrote {written.html} and {written.md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
