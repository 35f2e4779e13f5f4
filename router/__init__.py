"""kvrelay.router."""
