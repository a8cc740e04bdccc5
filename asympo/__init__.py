"""ASymPO: asynchronous RL post-training with asymmetric-scale policy optimization.

The package is the library: losses, advantages, the wire codec and streams,
tasks, verifiers, model loading, configuration and the CLI. Importing it starts
nothing and needs no service.
"""

__version__ = "0.1.0"
