"""Property tests: the annotation loader gives a CaptionSet or a VlcapError for any input, and
the prediction/CSV writers round-trip any text, atomically."""
import csv
import errno
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlcap.core.data import CaptionSet, load_captions
from vlcap.core.errors import VlcapError
from vlcap.core.outputs import write_csv, write_predictions

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=12)
# Documents close to the real schema (few distinct ids, so duplicates and orphans happen) reach
# the loader's deeper checks far more often than random JSON does.
ids = st.integers(-1, 3) | st.sampled_from([2.0, 1.5, float("inf"), float("nan"), True, "1", None, [1]])
fields = {"id": ids, "image_id": ids, "file_name": scalars, "caption": scalars}
entries = st.fixed_dictionaries({}, optional=fields) | json_values
images = st.fixed_dictionaries({"id": ids, "file_name": st.sampled_from(["a.jpg", "a.png", "b.jpg"]) | scalars})
annotations = st.fixed_dictionaries({"image_id": ids, "caption": scalars})
annotation_files = st.fixed_dictionaries({"images": st.lists(images | entries, max_size=4),
                                          "annotations": st.lists(annotations | entries, max_size=4)})


def check_loader(path):
    try:
        captions = load_captions(path)
    except VlcapError as error:
        assert "\n" not in str(error) and str(path) in str(error)
        return
    assert isinstance(captions, CaptionSet)
    references = captions.references()
    assert sum(map(len, references.values())) == len(captions.captions)


@FUZZ
@given(document=annotation_files | st.fixed_dictionaries({}, optional={"images": json_values, "annotations": json_values})
       | json_values)
def test_annotation_loader_never_crashes_on_json(document):
    with tempfile.TemporaryDirectory() as root:
        path = Path(root) / "captions.json"
        path.write_text(json.dumps(document), encoding="utf-8")  # NaN/Infinity included, as json allows
        check_loader(path)


@FUZZ
@given(raw=st.binary(max_size=64))
def test_annotation_loader_never_crashes_on_bytes(raw):
    with tempfile.TemporaryDirectory() as root:
        path = Path(root) / "captions.json"
        path.write_bytes(raw)
        check_loader(path)


@FUZZ
@given(predictions=st.dictionaries(st.text(), st.text(), max_size=6))
def test_predictions_round_trip_any_text(predictions):
    with tempfile.TemporaryDirectory() as root:
        path = Path(root) / "pred.json"
        write_predictions(path, predictions)
        assert json.loads(path.read_text(encoding="utf-8")) == predictions
        assert os.listdir(root) == ["pred.json"]  # no temporary file left behind


@FUZZ
@given(header=st.lists(st.text(), min_size=1, max_size=4), rows=st.lists(st.lists(st.text(), max_size=4), max_size=5))
def test_csv_round_trips_any_text(header, rows):
    with tempfile.TemporaryDirectory() as root:
        path = Path(root) / "table.csv"
        write_csv(path, header, rows)
        with open(path, newline="", encoding="utf-8") as f:
            assert list(csv.reader(f)) == [header, *rows]


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "pred.json"
    write_predictions(path, {"a": "old"})
    with pytest.raises(TypeError):
        write_predictions(path, {"a": object()})  # fails half-way through json.dump
    assert json.loads(path.read_text()) == {"a": "old"} and os.listdir(tmp_path) == ["pred.json"]


WRITER = textwrap.dedent("""
    import sys
    from vlcap.core.outputs import write_predictions
    versions = [{f"image_{i}": text * 20 for i in range(2000)} for text in ("old ", "new ")]
    write_predictions(sys.argv[1], versions[0])
    print("ready", flush=True)
    while True:
        for version in versions:
            write_predictions(sys.argv[1], version)
""")


def test_a_kill_at_any_moment_leaves_the_old_or_the_new_file(tmp_path):
    path = tmp_path / "pred.json"
    process = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "ready\n"
    seen = set()
    for _ in range(20):  # read while it rewrites: every read is a whole file
        time.sleep(0.02)
        seen.add(next(iter(json.loads(path.read_text()).values())).split()[0])
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert next(iter(json.loads(path.read_text()).values())).split()[0] in {"old", "new"}
    assert seen <= {"old", "new"}


def test_outputs_follow_the_umask_and_replaced_files_keep_their_mode(tmp_path):
    old = os.umask(0o022)
    try:
        write_predictions(tmp_path / "a.json", {"a": "x"})
        os.umask(0o077)
        write_predictions(tmp_path / "b.json", {"a": "x"})
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
    assert (tmp_path / "b.json").stat().st_mode & 0o777 == 0o600
    (tmp_path / "a.json").chmod(0o640)
    write_predictions(tmp_path / "a.json", {"a": "y"})
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o640


@pytest.mark.parametrize("failure, message", [
    (OSError(errno.ENOSPC, "No space left on device"), "cannot write \\(No space left on device\\); the disk is full"),
    (RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 4480 vs 4374"),
     "cannot write \\(the writer stopped part-way: .* free on that disk\\)"),
])
def test_a_full_disk_is_one_line_and_leaves_no_temp_file(tmp_path, failure, message):
    from vlcap.core.atomic import atomic_write
    path = tmp_path / "last.safetensors"
    with pytest.raises(VlcapError, match=f"{path}: {message}"):
        with atomic_write(path) as f:
            f.write(b"partial")
            raise failure
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("where", ["/proc/vlcap-test/pred.json", "/proc/pred.json", "{tmp}/file/pred.json"])
def test_unwritable_places_are_one_line(tmp_path, where):
    (tmp_path / "file").write_text("a file, not a folder")
    path = where.format(tmp=tmp_path)
    with pytest.raises(VlcapError, match=f"^{path}: cannot write"):
        write_predictions(path, {"a": "x"})
    assert os.listdir(tmp_path) == ["file"]

