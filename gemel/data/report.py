"""ReadReport: what a reader kept, dropped and could not find, so nothing is lost silently."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from gemel.errors import BadRecords


@dataclass
class ReadReport:
    """Counts from one read of a mentions file (returned by :func:`gemel.data.read_release`)."""

    path: str
    format: str
    split: str | None = None
    records: int = 0  # records (sentences) read after split selection
    mentions: int = 0
    nil: int = 0  # mentions whose gold answer is "nil" (kept, marked, see gemel.data.NIL)
    image_records: int = 0  # records with an image found on disk
    images_found: int = 0  # mentions with an image found on disk
    images_missing: int = 0  # mentions whose image is named (or implied) but not on disk
    missing_example: str | None = None  # one path that was looked for, for the message
    images_dir: str | None = None  # the folder images were looked up in, if any
    split_ids: int = 0  # ids listed for the split
    split_ids_absent: int = 0  # listed ids with no record in the file
    dropped_overlap: int = 0  # records dropped because a later-priority split also lists them
    empty_records: int = 0  # records with no mention at all (kept out)
    limited: bool = False  # reading stopped at `limit`
    notes: list[str] = field(default_factory=list)
    bad: BadRecords = field(default_factory=BadRecords)  # bad records skipped or made error rows

    def __post_init__(self) -> None:
        self.bad.path = self.path

    def to_json(self) -> dict:
        return {**asdict(self), "bad": self.bad.to_json()}

    def missing_images_message(self) -> str | None:
        """A one-line warning when some images were not found, else None."""
        if not self.images_missing:
            return None
        where = (f"under {self.images_dir}" if self.images_dir
                 else "(no images folder was given or found)")
        return (f"{self.path}: {self.images_missing} of {self.mentions} mentions name an image "
                f"that was not found {where}, e.g. {self.missing_example!r}; they are read "
                "without an image (text only). Pass images_dir= (CLI: --images) to the folder "
                "holding the release's images")
