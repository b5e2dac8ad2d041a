"""Finding a mention's image on disk: each release names its images its own way."""
from __future__ import annotations

import os
from pathlib import Path

from gemel.data.report import ReadReport


class ImageFinder:
    """Looks up image files and records what it found in a :class:`ReadReport`.

    ``base``: the data file's folder (relative paths in the file are relative to it).
    ``images_dir``: the folder the user named; when None, the first existing of ``defaults``
    (folders relative to ``base``, e.g. ``images/`` beside WikiMEL.json) is used.
    ``enabled=False``: every lookup answers None and counts nothing.
    """

    def __init__(self, base: Path, images_dir: str | os.PathLike | None, report: ReadReport,
                 defaults: tuple[str, ...] = ("images",), enabled: bool = True):
        self.base = os.path.abspath(base)
        self.enabled = enabled
        folder = os.fspath(images_dir) if images_dir is not None else None
        if folder is None:
            folder = next((os.path.join(self.base, d) for d in defaults
                           if os.path.isdir(os.path.join(self.base, d))), None)
        self.folder = os.path.abspath(folder) if folder is not None else None
        self.report = report
        report.images_dir = self.folder if enabled else None
        self._listings: dict[str, frozenset[str]] = {}

    def find(self, names: list[str], n_mentions: int = 1) -> str | None:
        """The first of ``names`` that exists, as an absolute path, or None.

        Each name is tried under the images folder, then against the data file's folder (an
        absolute name as it is). Counts ``n_mentions`` mentions as found or missing.
        """
        if not self.enabled:
            return None
        tried: list[str] = []
        for name in names:
            if os.path.isabs(name):
                tried.append(os.path.normpath(name))
                continue
            if self.folder is not None:
                tried.append(os.path.normpath(os.path.join(self.folder, name)))
            tried.append(os.path.normpath(os.path.join(self.base, name)))
        for p in tried:
            if self._exists(p):
                self.report.images_found += n_mentions
                self.report.image_records += 1
                return p
        self.report.images_missing += n_mentions
        if self.report.missing_example is None and tried:
            self.report.missing_example = tried[0]
        return None

    def _exists(self, p: str) -> bool:
        # One directory listing per folder instead of a stat per record: WikiMEL looks up 22k
        # names in a folder of 45 files.
        folder, name = os.path.split(p)
        names = self._listings.get(folder)
        if names is None:
            try:
                with os.scandir(folder) as it:
                    names = frozenset(e.name for e in it if e.is_file())
            except OSError:  # missing or unreadable folder: nothing found there
                names = frozenset()
            self._listings[folder] = names
        return name in names
