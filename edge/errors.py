"""The one exception type a user sees: its message is a single line naming the file or flag and what to do."""


class EdgeError(Exception):
    """A problem the user can fix (bad file, bad flag, not enough memory); printed as one line, exit 2."""
