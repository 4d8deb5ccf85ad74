"""The one exception type a user sees: its message is a single line naming the file or flag and what to do."""


def one_line(text: str) -> str:
    """Text with its line breaks and other unprintable characters escaped (a file name or a flag's value can
    hold them), so that it prints as one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


class EdgeError(Exception):
    """A problem the user can fix (bad file, bad flag, not enough memory); printed as one line, exit 2."""

    def __init__(self, message: str = ""):
        super().__init__(one_line(message))
