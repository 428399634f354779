"""Reading corpora and writing feature shards: sources, decoding, text, shards and feature-corpus importers."""
