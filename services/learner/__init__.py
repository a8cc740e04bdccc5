"""The learner service: one process; see main.py for the entrypoint."""
