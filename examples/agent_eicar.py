#!/usr/bin/env python3
"""Example vetd agent: denies files that start with the EICAR test string.

    python3 examples/agent_eicar.py /run/vetd-eicar.sock

and in vetd.toml:

    [plugins.eicar]
    use = "agent"
    socket = "/run/vetd-eicar.sock"
"""

import logging
import os
import sys

from vetd.agentkit import serve

EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"


def scan(fd: int, request: dict) -> tuple[str, str]:
    """Read the head of the file through the fd vetd passed; the path is for display only."""
    if os.pread(fd, len(EICAR), 0) == EICAR:
        return "deny", "EICAR-Test-File"
    return "allow", ""


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} SOCKET_PATH")
    logging.basicConfig(level=logging.INFO, format="agent_eicar: %(levelname)s %(message)s")
    serve(sys.argv[1], scan, workers=4, software="agent_eicar 1.0")
