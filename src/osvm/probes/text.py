"""Short quoted excerpts of response bodies and command output for probe details."""

DEFAULT_SNIPPET_CHARS = 200


def snippet(text: str, limit: int = DEFAULT_SNIPPET_CHARS) -> str:
    """Return the stripped text quoted with repr(), cut to `limit` characters with "..." appended."""
    stripped = text.strip()
    if len(stripped) > limit:
        stripped = stripped[:limit] + "..."
    return repr(stripped)


def last_line(text: str, limit: int = DEFAULT_SNIPPET_CHARS) -> str:
    """Return the last non-blank line of the text, cut to `limit` characters, or "" when there is none."""
    for line in reversed(text.splitlines()):
        stripped = line.strip()
        if stripped:
            if len(stripped) > limit:
                return stripped[:limit] + "..."
            return stripped
    return ""
