"""The errors ovseg raises on purpose.

Every error meant for the person using ovseg derives from :class:`OvsegError`, so an application
can tell "your input cannot be used" (show the message) from a bug (a traceback). Each also derives
from the built-in type it always was (``ValueError`` or ``RuntimeError``), so existing ``except``
clauses keep working.
"""

from __future__ import annotations


class OvsegError(Exception):
    """Base of every error ovseg raises about its input, its weights or how it is called."""


class UnknownMethodError(OvsegError, ValueError):
    """A method name that is not registered, or not in this predictor."""


class OptionError(OvsegError, ValueError):
    """An option or config field a method does not have, or a value it cannot take."""


class UntrainedHeadError(OvsegError, ValueError):
    """A method without a training-free path was asked to segment without trained head weights."""


class NoImageError(OvsegError, RuntimeError):
    """A prediction or features were asked for before an image was given."""


class WeightsError(OvsegError, ValueError):
    """Weights that cannot be loaded, with a message naming the file and the problem: missing,
    corrupt, written for another model, or a pickle holding more than tensors."""


class MissingWeightsError(WeightsError, FileNotFoundError):
    """A weights file that does not exist."""
