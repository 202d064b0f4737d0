"""The decoder every export carries in `custom_generate/` (copied by `adapt.export.writer`).

`generate.py` and the primitives it imports from `primitives.py` are self-contained (torch and transformers only,
never `adapt`): transformers loads them from the export folder as the model's `generate` under
`trust_remote_code=True`. The library imports the same primitives from here, so each is written once.
"""
