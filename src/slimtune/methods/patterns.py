"""User-supplied module regexes (`target_modules`, `rank_pattern`, `alpha_pattern`) matched in bounded time.

Python's `re` backtracks: a pattern such as `(.|.)*[ab]` takes time exponential in the length of the
module path it is tried on (a 31-character path: minutes). These patterns come from config files and
from the adapter_config.json of any adapter a server is asked to load, so a hostile or careless
pattern must not be able to hang a training start or the server's engine thread. Patterns are
therefore compiled with the `regex` module (the same syntax as `re` for these patterns) and every
match runs under a time limit; a pattern is also bounded in length. Going over either is an error
of the caller's class that names the pattern and the fix.
"""

from __future__ import annotations

import regex

MAX_PATTERN_CHARS = 512  # longer than any real module pattern (a path of a deep model is ~60 characters)
MATCH_SECONDS = 0.1  # per match against one module path; a sane pattern needs microseconds


class ModulePattern:
    """One compiled module pattern; `fullmatch` / `match` answer within `MATCH_SECONDS` or raise `error`.

    `suffix=True` compiles PEFT's rank_pattern / alpha_pattern form: the key matches a module path that
    ends with it after a dot, `(.*\\.)?(key)$`, matched from the path's start."""

    def __init__(self, pattern: str, what: str, error: type[Exception], suffix: bool = False) -> None:
        self.pattern = pattern
        self.what = what  # e.g. "target regex", "lora.rank_pattern key": opens every message
        self.error = error
        if not isinstance(pattern, str):
            raise error(f"{what} {pattern!r} must be a string")
        if len(pattern) > MAX_PATTERN_CHARS:
            raise error(f"{what} of {len(pattern)} characters is over the limit of {MAX_PATTERN_CHARS}: "
                        "use a shorter pattern, or a list of module names")
        try:
            regex.compile(pattern, flags=regex.VERSION0)  # the key alone, so a syntax error is reported as its own
            self._compiled = regex.compile(rf"(.*\.)?({pattern})$" if suffix else pattern, flags=regex.VERSION0)
        except (regex.error, RecursionError, OverflowError) as exc:
            raise error(f"{what} '{pattern}' is invalid ({exc}); fix it, or give a list of module names") from None

    def _run(self, method: str, text: str) -> bool:
        try:
            return getattr(self._compiled, method)(text, timeout=MATCH_SECONDS) is not None
        except TimeoutError:
            raise self.error(f"{self.what} '{self.pattern}' takes over {MATCH_SECONDS} s to match the module path "
                             f"'{text}' (nested repetition such as (.|.)* backtracks exponentially): simplify it"
                             ) from None

    def fullmatch(self, text: str) -> bool:
        return self._run("fullmatch", text)

    def match(self, text: str) -> bool:
        return self._run("match", text)

