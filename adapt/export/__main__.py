"""Export any complete DeepSpeed checkpoint of a run to a self-describing HF folder.

    python -m adapt.export checkpoints/<run> [--tag step_0000100] [--out DIR] [--dtype bf16|fp32]

Works for every ZeRO stage (ZeRO-3 shards are consolidated with DeepSpeed's zero_to_fp32) and
writes to a temporary folder that is renamed into place, so a reader never sees half an export.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from adapt.train.checkpoint import complete_tags  # noqa: E402
from adapt.export.writer import export  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adapt.export", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a run folder, e.g. checkpoints/llama_to_mdlm")
    parser.add_argument("--tag", default=None, help="checkpoint to export (default: the latest complete one)")
    parser.add_argument("--out", default=None, help="output folder (default: RUN_DIR/final)")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default=None,
                        help="weight dtype of the export (default: the run's model.dtype)")
    parser.add_argument("--list", action="store_true", help="list the complete checkpoints and exit")
    args = parser.parse_args(argv)
    from adapt.cli.errors import friendly

    with friendly():
        if args.list:
            print("\n".join(complete_tags(Path(args.run_dir))) or "no complete checkpoint")
            return 0
        out = export(Path(args.run_dir), tag=args.tag, out=Path(args.out) if args.out else None, dtype=args.dtype)
        print(f"exported {args.run_dir} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
