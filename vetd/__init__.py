"""vetd: a Linux file-access vetting daemon built on fanotify permission events."""

__version__ = "0.1.0"
