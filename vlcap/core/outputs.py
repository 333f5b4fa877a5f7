"""Prediction JSON and CSV files, written atomically: a kill leaves the old file or the new one."""
import csv
import json

from vlcap.core.atomic import atomic_write


def write_predictions(path, predictions):
    """``{file stem: caption}`` as the course's prediction JSON (UTF-8, not ASCII-escaped)."""
    with atomic_write(path, "w") as f:
        json.dump(dict(predictions), f, ensure_ascii=False, indent=1)
        f.write("\n")


def write_csv(path, header, rows):
    """A CSV with a header row; any field may hold commas, quotes or line breaks."""
    with atomic_write(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
