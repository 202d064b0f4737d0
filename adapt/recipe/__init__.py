"""The recipe: its typed schema, how it is loaded and validated (defaults < YAML < overrides)."""
