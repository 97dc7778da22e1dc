"""Hash-list scanner: deny files whose SHA-256 is on a list (the simplest useful scanner).

List files hold one entry a line; `#` starts a comment. Two forms:
  HASH  NAME          the `sha256sum` output format, as is
  HASH:SIZE:NAME      ClamAV's .hsb form, with the file size in bytes
When every entry carries its size, files of any other size are not hashed at all: hashing is
most of the cost of this plugin, and a deny list rarely holds many distinct sizes. The hash is
computed through the event fd by the SDK and shared with any other plugin that asks for it.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from typing import Any

from vetd.sdk import API_VERSION, check_keys, Opener, Plugin, PluginConfigError, ScanFile, Verdict

_HEX = frozenset(string.hexdigits)


def parse_list(text: str, source: str) -> dict[str, tuple[str, int | None]]:
    """hash -> (name, size or None); PluginConfigError names the file and line of a bad entry."""
    out: dict[str, tuple[str, int | None]] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        size: int | None = None
        if ":" in line.split(None, 1)[0]:
            digest, _, rest = line.partition(":")
            size_text, _, name = rest.partition(":")
            if not size_text.isdigit():
                raise PluginConfigError(f"{source}:{lineno}: expected HASH:SIZE:NAME with a size in "
                                        f"bytes, got size {size_text[:40]!r}")
            size = int(size_text)
        else:
            digest, _, name = line.partition(" ")
        digest = digest.lower()
        if len(digest) != 64 or not set(digest) <= _HEX:
            raise PluginConfigError(f"{source}:{lineno}: expected a 64-digit SHA-256 hex, got {digest[:80]!r}")
        out[digest] = (name.strip().lstrip("*") or digest[:12], size)
    return out


class HashList(Plugin):
    name = "hashlist"
    api_version = API_VERSION

    def __init__(self, config: Mapping[str, Any]):
        super().__init__(config)
        files = config.get("deny", [])
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            raise PluginConfigError("deny: expected a list of hash-list file paths")
        check_keys(config, {"deny"})
        self.deny: dict[str, tuple[str, int | None]] = {}
        for path in files:
            try:
                with open(path, encoding="utf-8") as fh:
                    self.deny.update(parse_list(fh.read(), path))
            except OSError as e:
                raise PluginConfigError(f"deny: cannot read {path}: {e.strerror}") from e
            except UnicodeDecodeError:
                raise PluginConfigError(f"deny: {path} is not UTF-8 text") from None

        sizes = {size for _, size in self.deny.values()}
        # None: some entry has no size, so every file must be hashed
        self.sizes: frozenset[int] | None = None if None in sizes else frozenset(sizes)  # type: ignore[arg-type]

    def scan(self, file: ScanFile, opener: Opener) -> Verdict:
        if not self.deny or (self.sizes is not None and file.size not in self.sizes):
            return Verdict.allow()
        entry = self.deny.get(file.sha256())
        if entry is not None and (entry[1] is None or entry[1] == file.size):
            return Verdict.deny(f"sha256:{entry[0]}")
        return Verdict.allow()
