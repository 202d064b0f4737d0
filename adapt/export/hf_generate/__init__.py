"""The decoder every export carries as `custom_generate/generate.py` (copied by `adapt.export.writer`).

`generate.py` is self-contained (torch and transformers only, never `adapt`): transformers loads it
from the export folder as the model's `generate` under `trust_remote_code=True`. It is importable
here as `adapt.export.hf_generate.generate` for tests and for the library's own checks.
"""
