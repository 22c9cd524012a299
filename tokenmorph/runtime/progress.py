"""Progress of long phases for people and for log files: tqdm's bar on a terminal; elsewhere (a
SLURM log, a pipe) plain lines with the rate and the ETA, since a carriage-return bar in a file
is one unreadable line."""

from __future__ import annotations

import sys
import time

__all__ = ["is_terminal", "format_seconds", "Progress"]


def is_terminal() -> bool:
    """Whether progress goes to a terminal (stderr, where tqdm draws its bar)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # closed or replaced stream
        return False


def format_seconds(s: float) -> str:
    """3725 -> '1:02:05'."""
    s = max(int(round(s)), 0)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    """``total`` units of work named ``desc``: a tqdm bar on a terminal, else a ``[tokenmorph]``
    line at every tenth of the work (and at the end) with the rate and the ETA; nothing when
    ``enabled`` is False. Both go to stderr, as tqdm's bar does: stdout keeps a command's
    results (e.g. the JSON last line of an evaluation). Use as a context manager; :meth:`update`
    adds done units."""

    def __init__(self, total: int, desc: str, unit: str = "it", enabled: bool = True) -> None:
        self.total, self.desc, self.unit, self.enabled = max(int(total), 0), desc, unit, enabled
        self.done, self.t0, self._next_tenth, self.bar = 0, time.perf_counter(), 1, None
        self.postfix: dict = {}
        if enabled and is_terminal():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, desc=desc, unit=unit, dynamic_ncols=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1, **postfix) -> None:
        self.done += n
        self.postfix.update(postfix)
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(self.postfix, refresh=False)
        elif self.enabled and self.total and self.done * 10 >= self._next_tenth * self.total:
            self._next_tenth = self.done * 10 // self.total + 1
            print(f"[tokenmorph] {self.line()}", file=sys.stderr, flush=True)

    def line(self) -> str:
        """'train features: 5000/10000 img (50%), 812.3 img/s, elapsed 0:00:06, ETA 0:00:06'."""
        elapsed = time.perf_counter() - self.t0
        rate = self.done / max(elapsed, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        extra = "".join(f", {k} {v}" for k, v in self.postfix.items())
        return (
            f"{self.desc}: {self.done}/{self.total} {self.unit} "
            f"({100 * self.done // max(self.total, 1)}%), {rate:.1f} {self.unit}/s, elapsed "
            f"{format_seconds(elapsed)}, ETA {format_seconds(eta)}{extra}"
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
