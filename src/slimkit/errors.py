"""The one exception type that means "the user gave us something wrong".

The CLI prints these as a single line and exits non-zero; anything else is a
bug and keeps its traceback.
"""


class SlimkitError(Exception):
    """A problem with the user's input (file, option, recipe, data), stated for people."""
