"""The one exception type peftlab raises for bad input.

Every message names what was wrong, the value received, and what to do. The CLI prints
the message (no traceback) and exits with status 2.
"""


class PeftlabError(Exception):
    """Bad input or an impossible setting, explained for the user."""


class ConfigError(PeftlabError):
    """A config key or value that cannot be used."""


class DataError(PeftlabError):
    """A data file or record that cannot be used (the message names file, record and field)."""
