"""What the dashboard may show. Reports and job errors are written for the machine that made them: an error line
can name a local file (`cannot write to /home/ana/builds/...`) or, from a third-party tool, echo a URL with its
password. Every string a page or the JSON API shows passes through `public_text` (the templates' finalize hook,
views' JSON), so no template can forget it."""

from __future__ import annotations

import re

from markupsafe import Markup  # Jinja's own string type (a dependency of jinja2)

# A local absolute path: a "/" that starts a word (not one inside a URL, after "scheme:" or a host name), then at
# least one more component. Windows drive paths too. Each is shown as its last component, which names the file.
_POSIX_PATH = re.compile(r"(?<![\w.:/~-])/(?:[^\s/'\"<>()\[\]{},;]+/)+([^\s/'\"<>()\[\]{},;]*)")
_WINDOWS_PATH = re.compile(r"\b[A-Za-z]:\\(?:[^\s\\'\"<>]+\\)*([^\s\\'\"<>]*)")
# Secrets: Hugging Face tokens, a password in a URL, and NAME=VALUE / NAME: VALUE for names that hold secrets.
_HF_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{20,}")
_URL_PASSWORD = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^\s:/@]+:)[^\s@/]+@", re.IGNORECASE)
_NAMED_SECRET = re.compile(r"(\b(?:token|password|passwd|secret|api[_-]?key)\b\s*[=:]\s*)[^\s,;&]+", re.IGNORECASE)


def public_text(text: str) -> str:
    text = _HF_TOKEN.sub("hf_***", text)
    text = _URL_PASSWORD.sub(r"\1***@", text)
    text = _NAMED_SECRET.sub(r"\1***", text)
    text = _POSIX_PATH.sub(lambda m: f"…/{m.group(1)}" if m.group(1) else "…/", text)
    return _WINDOWS_PATH.sub(lambda m: f"…\\{m.group(1)}", text)


def public_value(value):
    """The templates' finalize hook: strings made public, anything else as it is (Jinja escapes what follows).
    Markup is what a filter made of values a view already made public (tojson, join): changing it could break it."""
    return public_text(value) if isinstance(value, str) and not isinstance(value, Markup) else value
