"""The run's own log (``<run dir>/run.log``) and the one-paragraph message a failed run prints instead of a traceback.

Why a handler of its own rather than ``logging.FileHandler``: the run directory does not exist yet when logging
starts, ``--force`` renames and deletes the old one after the first lines, and a folder prunelab refuses to touch
(``out/Documents``) must get no ``run.log``. So lines are held back until the directory carries prunelab's marker
(a new one, for a fresh or forced run; any, for ``--resume``), then appended; each line opens and closes the
file, so a directory replaced underneath never swallows lines. Only the main process (rank 0) writes.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import tempfile
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prunelab.recipe import RecipeError
from prunelab.rundir import MARKER
from prunelab.runner import RunError

LOG_NAME = "run.log"
FOLLOW = "as the message says"  # the exception's own text already names the fix
MAX_HELD = 10_000  # lines held back before the run directory exists (a few hundred in practice)


class RunLog(logging.Handler):
    """Every log record of the run, appended to ``run_dir/run.log`` once the run directory is prunelab's."""

    def __init__(self, run_dir: Path, resume: bool = False) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S"))
        self.run_dir, self.resume = Path(run_dir), resume
        self.main = os.environ.get("RANK", "0") == "0"
        self._stale = self._marker_stat()  # the marker of a run that --force will replace: not ours to write in
        self._held: list[str] = []

    def _marker_stat(self) -> tuple[int, int] | None:
        try:
            st = (self.run_dir / MARKER).stat()
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns

    def ready(self) -> bool:
        """The run directory is this run's: created or taken over by it (the marker is new), or resumed."""
        if not self.main or not self.run_dir.is_dir():
            return False
        marker = self._marker_stat()
        if self.resume:
            return marker is not None or any(self.run_dir.glob("[0-9][0-9]-*/done.json"))
        return marker is not None and marker != self._stale

    def _append(self, lines: list[str]) -> bool:
        if not lines or not self.ready():
            return False
        with open(self.run_dir / LOG_NAME, "a", encoding="utf-8") as f:
            f.write("".join(line if line.endswith("\n") else line + "\n" for line in lines))
        return True

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            if self._held or not self._append([line]):
                self._held = [*self._held, line][-MAX_HELD:]
                if self._append(self._held):
                    self._held = []
        except Exception:  # noqa: BLE001 (a log line must never end the run)
            self.handleError(record)

    def write_traceback(self, exc: BaseException) -> Path | None:
        """The full traceback of ``exc`` in run.log (with the lines held back), or a temporary file when the run
        directory is not (yet) this run's; returns where it went (None: nowhere it could be written)."""
        if not self.main:
            return None
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        try:
            if self._append([*self._held, text]):
                self._held = []
                return self.run_dir / LOG_NAME
            fd, name = tempfile.mkstemp(prefix=f"prunelab-{self.run_dir.name}-", suffix=".log")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write("".join(line + "\n" for line in self._held) + text)
            return Path(name)
        except OSError:
            return None

    def __enter__(self) -> RunLog:
        root = logging.getLogger()
        self._level = root.level
        if root.getEffectiveLevel() > logging.INFO:  # the run's INFO lines reach run.log whatever the console shows
            root.setLevel(logging.INFO)
        root.addHandler(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        root = logging.getLogger()
        root.removeHandler(self)
        root.setLevel(self._level)
        self._append(self._held)
        self._held = []
        self.close()


@contextlib.contextmanager
def quiet_progress(quiet: bool) -> Iterator[None]:
    """With ``quiet`` (stderr is not a terminal), the libraries' own progress bars off too — transformers'
    ("Loading weights") and huggingface_hub's switches, and ``TQDM_DISABLE`` for bars built with tqdm's defaults;
    everything is put back afterwards (the API may run in the same process)."""
    if not quiet:
        yield
        return
    from huggingface_hub import utils as hub_utils  # lazy: startup
    from transformers.utils import logging as tf_logging  # lazy: torch-free

    tf_was, hub_was = tf_logging.is_progress_bar_enabled(), hub_utils.are_progress_bars_disabled()
    before = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    tf_logging.disable_progress_bar()
    hub_utils.disable_progress_bars()
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = before
        if tf_was:
            tf_logging.enable_progress_bar()
        if not hub_was:
            hub_utils.enable_progress_bars()


def failed_stage(exc: BaseException) -> str | None:
    """The stage folder (``03-calibrate``) that was running when ``exc`` was raised: the runner's loop frame."""
    tb, name = exc.__traceback__, None
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "_run_stages" and frame.f_globals.get("__name__") == "prunelab.runner":
            stage_dir = frame.f_locals.get("stage_dir")
            name = getattr(stage_dir, "name", None) or name
        tb = tb.tb_next
    return name


def _user_fix(exc: BaseException) -> str | None:
    """The fix for a failure caused by the input or the machine (None: an internal error)."""
    if getattr(exc, "user_error", False) or isinstance(exc, (RunError, RecipeError)):
        return FOLLOW
    if type(exc).__name__ == "OutOfMemoryError" or isinstance(exc, MemoryError):
        return ("the model or a batch does not fit in memory: lower batch_size / micro_batch_size / seq_len, choose "
                "a smaller dtype, or run on a device with more memory")
    if isinstance(exc, OSError):
        if exc.errno == errno.ENOSPC:
            return "the disk is full: free space (or choose another output_dir)"
        return "check that the file or folder named above exists, is readable and that the disk is writable"
    if isinstance(exc, UnicodeError):
        return "re-save the file named above as UTF-8 text"
    if isinstance(exc, ValueError):
        return "fix the input or setting named above"
    return None


def failure_message(exc: BaseException, recipe: str, run_dir: Path, log: Path | None) -> tuple[int, str]:
    """(exit code, one paragraph): what failed in which stage, on which input, the fix, where the traceback is.
    Exit codes: 2 a user's mistake (input, settings, the machine's memory or disk), 1 an internal error, 130 an
    interrupt. The run directory is left as it is: finished stages are kept and ``--resume`` continues."""
    stage = failed_stage(exc)
    where = f"stage {stage}" if stage else "the run"
    resume = (f"finished stages are kept in {run_dir}: after the fix, rerun with --resume to continue from "
              f"{stage or 'the first unfinished stage'}")
    trace = f"the full traceback is in {log}" if log else "no traceback could be written"
    if isinstance(exc, KeyboardInterrupt):
        return 130, f"interrupted in {where} (recipe {recipe}); {resume}."
    text = str(exc).strip() or type(exc).__name__
    fix = _user_fix(exc)
    if isinstance(exc, RunError) and stage is None:  # refused before any stage ran: nothing to resume or log
        return 2, f"error: {text}"
    if fix is not None:
        advice = "" if fix == FOLLOW else f" Fix: {fix}."
        return 2, (f"error: {where} failed on recipe {recipe}: {text}.{advice} {resume[0].upper()}{resume[1:]}; "
                   f"{trace}.")
    return 1, (f"error: internal error in {where} on recipe {recipe}: {type(exc).__name__}: {text}. This is a bug in "
               f"prunelab, not in your input; {trace} — please report it with that file. {resume[0].upper()}{resume[1:]}.")


def validation_crash(exc: BaseException, recipe: str) -> str:
    """The message for a recipe check that crashed (a bug in a validator, not the user's input): the traceback goes to
    a temporary file, as no run directory exists yet."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        fd, name = tempfile.mkstemp(prefix="prunelab-validate-", suffix=".log")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        where = f"the full traceback is in {name}"
    except OSError:
        where = "no traceback could be written"
    return (f"error: internal error while checking recipe {recipe}: {type(exc).__name__}: {exc}. This is a bug in "
            f"prunelab's checks, not necessarily in your recipe; {where} — please report it with that file. Nothing "
            "was loaded or written.")
