"""Progress bars for jobs, epochs and test images (tqdm), silenced when asked or not on a TTY."""

from __future__ import annotations

import sys
from typing import Any, Iterable, Iterator

from tqdm.auto import tqdm


class Progress:
    """Factory of nested progress bars.

    Parameters
    ----------
    enabled : bool or None
        ``None`` shows bars only when standard error is a terminal.
    """

    def __init__(self, enabled: bool | None = None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._depth = 0

    def bar(self, total: int | None = None, desc: str = "", unit: str = "it", leave: bool = False) -> tqdm:
        """Return a tqdm bar (a no-op bar when disabled); use as a context manager."""
        return tqdm(total=total, desc=desc, unit=unit, leave=leave, disable=not self.enabled,
                    position=self._depth, dynamic_ncols=True, file=sys.stderr)

    def iterate(self, iterable: Iterable[Any], total: int | None = None, desc: str = "", unit: str = "it") -> Iterator[Any]:
        """Wrap ``iterable`` in a bar one level below the current one."""
        self._depth += 1
        try:
            with self.bar(total=total, desc=desc, unit=unit) as bar:
                for item in iterable:
                    yield item
                    bar.update(1)
        finally:
            self._depth -= 1

    def epochs(self, n: int, desc: str = "epochs") -> Iterator[int]:
        """Iterate over ``range(n)`` with a bar labelled as epochs."""
        return self.iterate(range(n), total=n, desc=desc, unit="epoch")

    def write(self, message: str) -> None:
        """Print a line without breaking the bars."""
        tqdm.write(message, file=sys.stderr)
