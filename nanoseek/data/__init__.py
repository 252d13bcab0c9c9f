"""Data: sources and curation, built-in corpora (synth), tokenizer, token shards and the loader."""
