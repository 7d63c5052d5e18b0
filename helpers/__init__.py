"""Shared helpers for the Llama-2 Chinese notebook series."""
