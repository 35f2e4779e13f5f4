"""kvrelay.loadtest."""
