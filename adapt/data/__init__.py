"""The corpus: sources, token stores, training sequences, prompt/response data."""
