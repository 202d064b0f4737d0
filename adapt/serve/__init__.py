"""The server: OpenAI-compatible HTTP over the decoders (`python -m adapt.serve EXPORT`)."""
