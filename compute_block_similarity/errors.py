"""The one exception type for user mistakes: the CLI prints it as one line and exits 2."""


class UserError(Exception):
    """Bad input a user can fix. The message names the problem and the fix."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (or its type), for one-line errors."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def looks_local(path: str) -> bool:
    """A path, not a Hub id ("org/name"): it must then exist."""
    return path.startswith((".", "/", "~")) or path.count("/") > 1
