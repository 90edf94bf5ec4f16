"""The fast models: the reference models' parameters, computed with `moshi_fast.ops` only."""
