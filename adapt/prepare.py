"""`python -m adapt.prepare RECIPE [key=value ...]`: tokenise the recipe's corpus once into its token stores.

Each source of the recipe (`data.sources`, else `data.train_files`, else the embedded corpus) becomes a store under
`data.cache_dir`/stores (adapt.data.store), with `data.num_proc` tokenising workers and progress lines; a store that
exists is checked against its manifest's checksums instead. Training then opens the stores memory-mapped and
starts at once; without this step the first rank of a launch prepares them while the others wait. A second
prepare (or a launch) on the same cache waits for the first rather than writing a second copy.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

USAGE = "usage: python -m adapt.prepare RECIPE.yaml [section.key=value ...]"


def tokenizer_for(cfg):
    """The tokenizer training will use, its mask token named as training will name it (the store's tokenizer
    hash leaves the mask token out, so a store made here is the one training opens)."""
    from adapt.export import exported_meta
    from adapt.model.causal import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    meta = exported_meta(cfg.model.name_or_path)
    if meta is not None:
        tokenizer.mask_token = tokenizer.convert_ids_to_tokens(meta.mask_token_id)
    elif cfg.model.mask_token_id >= 0:
        tokenizer.mask_token = tokenizer.convert_ids_to_tokens(cfg.model.mask_token_id)
    elif cfg.model.mask_token in tokenizer.get_vocab():
        tokenizer.mask_token = cfg.model.mask_token
    return tokenizer


def prepare(cfg) -> dict:
    """Prepare (or check) every source's store; returns what the summary prints."""
    from adapt.data.corpus import DataError, build_sequences

    if cfg.stage != "adapt":
        raise DataError(f"the {cfg.stage} stage encodes its examples when it starts (a small file, cached under "
                        f"data.cache_dir); adapt.prepare prepares the adapt stage's corpus")
    tokenizer = tokenizer_for(cfg)
    t0 = time.perf_counter()
    data = build_sequences(cfg.data, tokenizer)
    seconds = time.perf_counter() - t0
    stores = [part.store for part in data.train.parts]
    for st in stores:
        bad = st.verify()
        if bad:
            raise DataError(f"{st.folder}: {', '.join(bad)} no longer match the checksums of its manifest (the "
                            f"store was changed after it was written); remove {st.folder} and prepare again")
    return {"seconds": seconds, "stores": [str(st.folder) for st in stores],
            "tokens": sum(len(st) for st in stores), "summary": data.summary}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help") or args[0].startswith("-"):
        print(USAGE + "\n\n" + __doc__, file=sys.stderr)
        return 0 if args and args[0] in ("-h", "--help") else 2
    from adapt.cli.errors import friendly
    from adapt.recipe.load import load_config

    try:
        with friendly():
            cfg = load_config(args[0], args[1:])
            out = prepare(cfg)
    except KeyboardInterrupt:
        print("error: interrupted; no partial store is kept (rerun to prepare it)", file=sys.stderr)
        return 130
    print(out["summary"].replace(" | ", "\n  "))
    print(f"{len(out['stores'])} token store(s), {out['tokens'] / 1e6:.2f}M tokens, ready in {out['seconds']:.1f} s "
          f"(checksums verified)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
