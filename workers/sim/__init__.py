"""kvrelay.workers.sim."""
