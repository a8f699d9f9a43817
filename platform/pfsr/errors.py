"""Errors that mean bad input (a file, a field, a flag) rather than a bug: the CLI prints them and exits 2."""


class InputError(ValueError):
    """Bad user input; the message names the file or field and what is wrong."""
