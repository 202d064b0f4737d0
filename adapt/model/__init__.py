"""The model: a causal LM loaded with a mask token, its attention masks, LoRA adapters."""
