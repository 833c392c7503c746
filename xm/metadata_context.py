"""Experiment and work-unit metadata: who created it and its annotations.

The base classes are deliberately inert so a backend only implements what it
can store.
"""

from __future__ import annotations

from xm import utils


class ContextAnnotations:
    """User-editable attributes of a context, such as its title.

    The defaults do nothing: backends override what they support.
    """

    @property
    def title(self) -> str:
        """A human-readable title; titles need not be unique."""
        return ""

    def set_title(self, title: str) -> None:
        """Sets the title (ignored unless a backend stores it)."""


class MetadataContext(utils.ValueObject):
    """Metadata attached to an experiment or a work unit.

    Attributes:
      creator: user name of whoever created the context.
      annotations: the user-editable annotations.
    """

    def __init__(self, creator: str, annotations: ContextAnnotations) -> None:
        self.creator = creator
        self.annotations = annotations
