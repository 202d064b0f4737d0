"""Local lm-eval tasks made from the held-out corpus (see make_data.py); YAML files here are found by
`python -m eval.harness` (it adds this folder as --include_path)."""
