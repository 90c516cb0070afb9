"""Where the project's shared folder is (FORMAT.md's data files, ../shared/data): $QCKPT_SHARED, else
`../shared` beside the checkout, else /work/shared. Tests read it in place and never copy it."""
import os
import pathlib

_REPO = pathlib.Path(__file__).resolve().parents[1]


def _find() -> pathlib.Path:
    candidates = [os.environ.get("QCKPT_SHARED"), _REPO.parent / "shared", "/work/shared"]
    for c in candidates:
        if c and pathlib.Path(c, "data").is_dir():
            return pathlib.Path(c)
    return _REPO.parent / "shared"  # missing: tests that need it say so by path


SHARED = _find()
DATA = SHARED / "data"
STORIES = str(DATA / "stories260K")
TINYSTORIES = str(DATA / "tinystories_val.txt")
