"""Hash-list scanner: deny files whose SHA-256 is on a list (the simplest useful scanner).

List files hold one hash a line, optionally followed by a name (the `sha256sum` output format
works as is); `#` starts a comment. The hash is computed through the event fd by the SDK and
shared with any other plugin that asks for it.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from typing import Any

from vetd.sdk import API_VERSION, Opener, Plugin, PluginConfigError, ScanFile, Verdict

_HEX = frozenset(string.hexdigits)


def parse_list(text: str, source: str) -> dict[str, str]:
    """hash -> name; raises PluginConfigError naming the file and line of a malformed entry."""
    out: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        digest, _, name = line.partition(" ")
        digest = digest.lower()
        if len(digest) != 64 or not set(digest) <= _HEX:
            raise PluginConfigError(f"{source}:{lineno}: expected a 64-digit SHA-256 hex, got {digest[:80]!r}")
        out[digest] = name.strip().lstrip("*") or digest[:12]
    return out


class HashList(Plugin):
    name = "hashlist"
    api_version = API_VERSION

    def __init__(self, config: Mapping[str, Any]):
        super().__init__(config)
        files = config.get("deny", [])
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            raise PluginConfigError("deny: expected a list of hash-list file paths")
        unknown = set(config) - {"deny"}
        if unknown:
            raise PluginConfigError(f"unknown key(s): {', '.join(sorted(unknown))}")
        self.deny: dict[str, str] = {}
        for path in files:
            try:
                with open(path, encoding="utf-8") as fh:
                    self.deny.update(parse_list(fh.read(), path))
            except OSError as e:
                raise PluginConfigError(f"deny: cannot read {path}: {e.strerror}") from e
            except UnicodeDecodeError:
                raise PluginConfigError(f"deny: {path} is not UTF-8 text") from None

    def scan(self, file: ScanFile, opener: Opener) -> Verdict:
        if not self.deny:
            return Verdict.allow()
        name = self.deny.get(file.sha256())
        if name is not None:
            return Verdict.deny(f"sha256:{name}")
        return Verdict.allow()
