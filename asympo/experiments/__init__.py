"""Offline experiments that drive the learner's own step (``asympo experiment ...``)."""
