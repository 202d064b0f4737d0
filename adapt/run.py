"""Entry point: `deepspeed adapt/run.py RECIPE [key=value ...]` or `python adapt/run.py RECIPE ...`."""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adapt.recipe.load import load_config  # noqa: E402

USAGE = "usage: [deepspeed] adapt/run.py RECIPE.yaml [section.key=value ...]"


def parse_args(argv: list[str]) -> tuple[str, list[str]]:
    # the deepspeed launcher appends --local_rank=N; the rank comes from the environment instead
    args = [a for a in argv if not a.startswith("--local_rank")]
    if args in (["-h"], ["--help"]):
        print(USAGE)
        raise SystemExit(0)
    if not args or args[0].startswith("-"):
        print(f"error: expected a recipe file first, then section.key=value overrides; got {args or 'nothing'}\n"
              f"{USAGE}", file=sys.stderr)
        raise SystemExit(2)
    return args[0], args[1:]


def main(argv: list[str] | None = None) -> int:
    recipe, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    from adapt.cli.errors import friendly
    from adapt.cli.errors import StoppedBeforeStart

    try:
        with friendly():
            cfg = load_config(recipe, overrides)
            from adapt.train.stages import STAGES

            STAGES[cfg.stage](cfg)
    except KeyboardInterrupt:  # the second Ctrl-C (adapt.train.loop's handler took the first)
        print("error: interrupted again: stopped at once without saving; every complete checkpoint is intact, "
              "rerun the same command to resume from the last one", file=sys.stderr)
        return 130
    except StoppedBeforeStart as stop:  # a signal before the first step: nothing to save, LOCK released at exit
        print(stop, file=sys.stderr)
        return stop.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
