"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class EtfError(Exception):
    """A user-facing error: bad input, missing cache, incompatible store.

    The message must name the file, sample or flag at fault and, where possible, the fix.
    """
