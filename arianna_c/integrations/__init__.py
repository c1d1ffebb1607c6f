"""Adapters for other frameworks; each module imports its framework only when used
(``arianna_c.integrations.ray``: Ray Data batch inference)."""
