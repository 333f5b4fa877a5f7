"""The one progress bar every long phase shows (training, captioning, scoring, embedding, caching)."""
import contextlib

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def progress_bar(label=None, console=None, *, stats=False, transient=False, disable=False):
    """A rich ``Progress`` on ``console`` (stderr by default): the label (fixed, or each task's
    description when ``label`` is None), bar, done/total, elapsed and remaining time. With
    ``stats`` each task also shows its ``stats`` field (e.g. the running loss). Use it as a
    context manager and ``add_task(description, total=...)``."""
    columns = [TextColumn(f"[bold]{label}" if label else "[bold]{task.description}"), BarColumn(),
               MofNCompleteColumn()]
    if stats:
        columns.append(TextColumn("{task.fields[stats]}"))
    columns += [TimeElapsedColumn(), TimeRemainingColumn()]
    return Progress(*columns, console=console or Console(stderr=True), transient=transient, disable=disable)


@contextlib.contextmanager
def progress_task(progress, description, total):
    """A task on the rich ``progress`` for the block (removed after it); yields ``advance(n)``.
    With ``progress`` None nothing is shown. (``stats`` is set, so a ``stats=True`` bar can show it.)"""
    if progress is None:
        yield lambda n: None
        return
    task = progress.add_task(description, total=total, stats="")
    try:
        yield lambda n: progress.advance(task, n)
    finally:
        progress.remove_task(task)
