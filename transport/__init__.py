"""kvrelay.transport."""
