"""The secret settings' values, every form they take in a text, and one scrubber that removes them.

A secret can reach a text raw, or escaped on the way: by repr() (an exception that quotes a header
value, and the repr of that exception), percent-encoded (a URL), JSON-escaped (a serialised body).
`Scrubber` knows each of those forms of each secret value and of the pieces an SDK may show alone
(the RabbitMQ URL's password, a Service Bus SharedAccessKey). It is used for log records (a filter
on the root logger's handlers, installed by `scrub_logs`), for exception texts the local host logs
and dead-letters, and for the operator commands' output.
"""

from __future__ import annotations

import json
import logging
import re
import unicodedata
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, quote_plus, unquote, urlsplit

if TYPE_CHECKING:
    from shared.settings import Settings

MASK = "***"
# Very short values are skipped: replacing "a" everywhere would mangle texts and protect nothing.
MIN_SECRET_LENGTH = 4


def unsafe_character(value: str) -> str | None:
    """What is wrong with the first character of `value` that has no place in a secret (whitespace,
    a control or other invisible character), and where; None when there is none. Never the value."""
    for position, char in enumerate(value, 1):
        if char in "\r\n":
            kind = "a line break"
        elif char == " ":
            kind = "a space"
        elif char == "\t":
            kind = "a tab"
        elif char.isspace():
            kind = "a whitespace character"
        elif unicodedata.category(char) == "Cc":
            kind = "a control character"
        elif not char.isprintable():
            kind = "an invisible character"
        else:
            continue
        return f"contains {kind} (U+{ord(char):04X}) at character {position}, which a secret cannot hold"
    return None


def secret_values(settings: Settings) -> set[str]:
    """The secret settings' values and the pieces of them that SDKs show on their own."""
    values: set[str] = set()
    for secret in (
        settings.rabbitmq_url,
        settings.service_bus_connection_string,
        settings.cosmos_key,
        settings.integration_manager_token,
    ):
        if secret is not None:
            values.add(secret.get_secret_value())
    if settings.rabbitmq_url is not None:
        password = urlsplit(settings.rabbitmq_url.get_secret_value()).password
        if password:
            values.update({password, unquote(password)})
    if settings.service_bus_connection_string is not None:
        for part in settings.service_bus_connection_string.get_secret_value().split(";"):
            name, _, value = part.partition("=")
            if name.strip().lower() in ("sharedaccesskey", "sharedaccesssignature") and value:
                values.add(value)
    return values


def _python_escaped(value: str) -> set[str]:
    """`value` as it shows inside a repr() or ascii(): either quote style, and as bytes."""
    forms = {value.encode("unicode_escape").decode("ascii"), repr(value.encode("utf-8"))[2:-1]}
    for escape in (repr, ascii):
        # As is, and single-quoted with ' escaped (inside the repr of a text holding both quotes).
        forms.update({escape(value)[1:-1], escape(value + "'\"")[1:-4]})
    return forms


def secret_forms(value: str) -> set[str]:
    """Every form of `value` a text may carry: raw, repr-escaped (once, and again: the repr of an
    exception whose message quotes it), percent-encoded, JSON-escaped. The Bearer header form
    contains one of these, so it is covered too."""
    forms = {value}
    forms.update(_python_escaped(value))
    for escaped in list(forms):
        forms.update(_python_escaped(escaped))
    forms.update({quote(value, safe=""), quote(value), quote_plus(value)})
    for dumped in (json.dumps(value), json.dumps(value, ensure_ascii=False)):
        forms.update({dumped[1:-1], json.dumps(dumped[1:-1])[1:-1]})
    return {form for form in forms if len(form) >= MIN_SECRET_LENGTH}


class Scrubber:
    """Removes every form of the secret settings' values from a text.

    `scrub(text)` only masks; calling the scrubber (as the operator commands do) also makes the text
    one printable line of at most `limit` characters."""

    def __init__(self, settings: Settings | None = None):
        sources = secret_values(settings) if settings is not None else set()
        forms = {form for source in sources if len(source) >= MIN_SECRET_LENGTH for form in secret_forms(source)}
        # Longest first, so a secret that contains another is removed whole. Case-insensitive: a
        # percent-encoder may write %2f for %2F, and masking a look-alike costs nothing.
        alternatives = "|".join(re.escape(form) for form in sorted(forms, key=len, reverse=True))
        self._pattern = re.compile(alternatives, re.IGNORECASE) if forms else None

    def __bool__(self) -> bool:
        return self._pattern is not None

    def finds(self, text: str) -> bool:
        """Whether `text` holds any form of a secret; cheaper than scrub for the usual text that holds none."""
        return self._pattern is not None and self._pattern.search(text) is not None

    def scrub(self, text: Any) -> str:
        """str(`text`) with every form of every secret replaced by `***`; unchanged when there are none."""
        value = str(text)
        return self._pattern.sub(MASK, value) if self._pattern is not None else value

    def __call__(self, text: Any, limit: int = 300) -> str:
        return printable(self.scrub(text), limit)


def printable(text: str, limit: int = 300) -> str:
    """One line, no control characters (a message could carry terminal escapes), at most `limit` chars."""
    cleaned = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 1] + "…"


class ScrubbingFilter(logging.Filter):
    """Masks secrets in a log record's message, arguments, traceback and stack. Put on handlers: a
    logger's own filters never see records that its children propagate to it."""

    def __init__(self, scrubber: Scrubber | None = None):
        super().__init__()
        self.scrubber = scrubber or Scrubber()

    def filter(self, record: logging.LogRecord) -> bool:
        """Mask secrets in `record` in place; always True (it never drops a record). A record without a secret is
        left as it is."""
        scrubber = self.scrubber
        if not scrubber:
            return True
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string; the handler reports it, with what we leave here
            message = f"{record.msg} {record.args!r}"
        if scrubber.finds(message) or (record.args and scrubber.finds(repr(record.args))):
            record.msg, record.args = scrubber.scrub(message), ()
        if record.exc_info or record.exc_text:
            trace = record.exc_text or _TRACEBACKS.formatException(record.exc_info)
            if scrubber.finds(trace):
                # Handlers print exc_text when it is set; exporters that format exc_info themselves
                # (e.g. to Application Insights) must not get the unscrubbed exception.
                record.exc_text, record.exc_info = scrubber.scrub(trace), None
        if record.stack_info and scrubber.finds(record.stack_info):
            record.stack_info = scrubber.scrub(record.stack_info)
        return True


_TRACEBACKS = logging.Formatter()
_log_filter = ScrubbingFilter()


def scrub_logs(settings: Settings) -> Scrubber:
    """Make every handler of the root logger mask `settings`' secrets (one shared filter, so calling
    this again only updates the secrets it knows)."""
    scrubber = Scrubber(settings)
    _log_filter.scrubber = scrubber
    for handler in logging.getLogger().handlers:
        if _log_filter not in handler.filters:
            handler.addFilter(_log_filter)
    return scrubber
