"""kvrelay.transport.kv."""
