"""The exceptions users see, each said in one line: bad input (with the fix), or a run stopped before its end."""


class UserError(Exception):
    """Bad input from the user. The CLI prints the message on one line and exits with code 2."""


class Interrupted(Exception):
    """The run was stopped (Ctrl-C) before its work was done: nothing was reported. The CLI adds how its command
    continues the run, and exits with code 130."""
