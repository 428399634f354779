"""Reading corpora and writing feature shards: sources, decoding, text, shards, tar / TFRecord readers.

Bytes only: nothing here imports a stage (embed, train, label, tune); ``tests/unit/test_layering.py`` checks it."""
