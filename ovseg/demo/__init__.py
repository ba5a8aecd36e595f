"""The Gradio demo (``app.py`` at the repository root launches it)."""

from ovseg.demo.app import build_demo, launch
from ovseg.demo.session import RunOptions, Session
from ovseg.demo.settings import DemoSettings, load_methods

__all__ = ["DemoSettings", "RunOptions", "Session", "build_demo", "launch", "load_methods"]
