"""Shared logic of the token-refresh function app: one module per job (see the README's code map)."""
