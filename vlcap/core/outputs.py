"""Prediction JSON and CSV files, written atomically: a kill leaves the old file or the new one.
Text that UTF-8 cannot hold (file names that are not valid UTF-8) is written escaped
(``data.text_name``), never a crash that loses every other row."""
import csv
import json

from vlcap.core.atomic import atomic_write
from vlcap.core.data import text_name


def as_text(value):
    return text_name(value) if isinstance(value, str) else value


def write_predictions(path, predictions):
    """``{file stem: caption}`` as the course's prediction JSON (UTF-8, not ASCII-escaped)."""
    with atomic_write(path, "w") as f:
        json.dump({as_text(k): as_text(v) for k, v in dict(predictions).items()}, f, ensure_ascii=False, indent=1)
        f.write("\n")


def write_csv(path, header, rows):
    """A CSV with a header row; any field may hold commas, quotes or line breaks."""
    with atomic_write(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(map(as_text, header))
        writer.writerows(map(as_text, row) for row in rows)
