"""The built-in demo: a small CNN trained on generated scenes, explained by every method."""
