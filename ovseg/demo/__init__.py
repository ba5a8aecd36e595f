"""The Gradio demo (``app.py`` at the repository root launches it)."""

from ovseg.demo.app import build_demo

__all__ = ["build_demo"]
