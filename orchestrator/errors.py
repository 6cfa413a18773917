"""The one exception users see: a problem with their input, said in one line with the fix."""


class UserError(Exception):
    """Bad input from the user. The CLI prints the message on one line and exits with code 2."""
