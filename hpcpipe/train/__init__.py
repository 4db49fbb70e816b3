"""Training: one rank's trainer, the loop, recovery, optimizer, state, the serial oracle."""
