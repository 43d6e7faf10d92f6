"""Helpers the CLI and distributed tests share (imported like toy_adapter: tests/ is on sys.path)."""

from __future__ import annotations

import socket


def one_error_line(r, *needles) -> str:
    """A typer CliRunner result refused bad input the project's way: exit 2, exactly one
    ``error: ...`` line on stderr holding every needle, no traceback."""
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.output
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def free_port() -> int:
    """A free localhost TCP port (the rendezvous of spawned gloo ranks)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
