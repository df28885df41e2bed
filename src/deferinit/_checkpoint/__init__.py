"""Checkpoints: sizes from saved tensors, ``di.load_state_dict``."""
