"""The one line of an error that goes into our messages ("cannot read X (<this line>): do Y")."""


def first_line(error, limit=300):
    """`error`'s first line, at most `limit` characters: an OSError's strerror ("No space left
    on device"), a TensorFlow error's message without its traceback, else str(error); the type's
    name when the text is empty."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = (getattr(error, "message", None) or str(error)).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    return line if len(line) <= limit else line[:limit] + "..."
