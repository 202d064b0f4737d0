"""Draw a run's held-out bounds against training tokens (adapt.train.curve).

    python -m adapt.curve RUN_DIR          (re)draws RUN_DIR/curve.png from RUN_DIR/metrics.jsonl
    python -m adapt.curve RUN_DIR... --out F.png   the bounds of several runs on one figure (a study's finalists)
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adapt.train.curve import CurveError, draw_runs, try_draw  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    out = None
    if "--out" in args:
        i = args.index("--out")
        out, args = (args[i + 1] if i + 1 < len(args) else ""), args[:i] + args[i + 2:]
    usage = "\n".join(line.strip() for line in __doc__.strip().splitlines()[2:4])
    if args in (["-h"], ["--help"]):
        print(f"usage:\n{usage}")
        return 0
    if not args or any(a.startswith("-") for a in args) or out == "" or (len(args) > 1 and out is None):
        print(f"usage:\n{usage}", file=sys.stderr)
        return 2
    if out is not None:
        try:
            path = draw_runs(args, out)["path"]
        except (CurveError, ImportError, OSError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        print(path)
        return 0
    path = try_draw(args[0], lambda line: print(line, file=sys.stderr))
    if path is None:
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
