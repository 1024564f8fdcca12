"""Exceptions the CLI maps to exit codes. Kept apart so that a fast reader
(`stats`) can catch them without importing the loader or pyroute2."""


class LoadError(Exception):
    """The kernel refused something (exit status 1)."""


class UsageError(Exception):
    """The operator asked for something impossible here (exit status 2)."""


class NetnsError(Exception):
    """A network namespace or an interface in it is missing or unusable."""
