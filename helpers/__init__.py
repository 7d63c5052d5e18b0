"""Shared helpers for the Llama-2 Chinese notebook series."""

from helpers.config import keep_token_from_mirrors

keep_token_from_mirrors()  # a token stored for huggingface.co never goes to an HF_ENDPOINT mirror
