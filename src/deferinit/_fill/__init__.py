"""Filling tensors: ``di.materialize``, shard slices, seeded streams, dispatch machinery."""
