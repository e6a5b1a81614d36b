"""The embedded demo model: scene world, tokenizer, architecture, training and loading."""
