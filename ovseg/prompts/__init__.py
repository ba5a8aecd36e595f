"""Prompts: text templates and visual prompt generators with their cache."""
