"""The reward service: one process; see main.py for the entrypoint."""
