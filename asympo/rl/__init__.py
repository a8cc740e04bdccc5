"""The RL core: losses (one ``LossSpec`` per loss), advantages, the training step, and the
probe that proves a weight swap. Pure torch; no Redis, no service, no wire format."""
