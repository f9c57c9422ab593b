"""The run directory: chosen once (rank 0 decides, every rank agrees), owned, locked, and written to
only once the run is known to start.

- Ownership: a directory the trainer starts a run in gets a marker, ``cotmi_run.json``.
  ``--overwrite`` replaces only a directory with the marker, and removes only what cotmi writes there
  (``RUN_ENTRIES``): a user's own files beside them stay.
- One writer: rank 0 holds an exclusive lock (flock) on ``cotmi_run.lock`` inside it for the run's
  life. A second writer, ``--resume auto`` of a live run included, is refused in one line naming the
  holder's host and pid (written into the lock file).
- Nothing before the start: the choice (``choose_run_dir``) only reads; ``claim`` creates, replaces
  and writes once every check that can fail before training has passed (config, DeepSpeed config,
  data, tokenizer, model, the engine built and the checkpoint loaded). Until then an old run being
  replaced stays whole.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from cotmi_ds.checkpoint.layout import (CHECKPOINTS, RESUME_FIELDS, latest_in_run, read_checkpoint, resolve,
                                        run_dir_of)
from cotmi_ds.config import TrainConfig
from cotmi_ds.data.own import dataset_name
from cotmi_ds.distributed import DistEnv, broadcast_str, on_main
from cotmi_ds.errors import UsageError
from cotmi_ds.files import write_json_atomic, write_problem, write_text_atomic

MARKER = "cotmi_run.json"
LOCK = "cotmi_run.lock"
MARKER_FORMAT = "cotmi-run/1"
# Everything cotmi writes into a run directory (the trainer, and `cotmi eval` of the run): all that
# --overwrite removes. The Slurm scripts' slurm.log and the doctor's .doctor/ belong to the job.
RUN_ENTRIES = ("config.yaml", "ds_config.json", "tokenizer", "tb", "predictions", "results.json", "status.json",
               CHECKPOINTS, "model", "eval_results.json")
# The replaced run's entries while the new one writes its first files, removed once it has.
REPLACED = "replaced-run.partial"
# The entries above, and the temporary names their atomic writes use (files.py, export.py).
_OURS = re.compile(rf"(?:{'|'.join(map(re.escape, RUN_ENTRIES))})(?:\.replaced)?(?:\.partial|\.tmp)?"
                   rf"|{re.escape(REPLACED)}")


def cotmi_entries(path: Path) -> list[Path]:
    """What cotmi wrote in a run directory (its own marker and lock aside)."""
    return sorted(p for p in path.iterdir() if _OURS.fullmatch(p.name))


class RunLock:
    """An exclusive flock on ``<run>/cotmi_run.lock``, released when the process ends (however it
    ends) or by ``release``. The file says who holds it: host, pid, since when."""

    def __init__(self, file: Path, fd: int | None):
        self.file, self.fd = file, fd

    @classmethod
    def take(cls, run_dir: Path) -> "RunLock":
        file = run_dir / LOCK
        fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise UsageError(f"--output_dir {run_dir} is in use by another cotmi train ({holder}); wait for it "
                             "to end (or stop it), or choose another directory") from None
        except OSError as e:  # a filesystem without locks (Lustre mounted with noflock): say so, go on
            os.close(fd)
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            print(f"warning: {file}: the filesystem refuses locks ({e.strerror}); nothing stops a second "
                  "cotmi train from writing into this run directory at the same time", flush=True)
            return cls(file, None)
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                   "since": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n").encode(), 0)
        return cls(file, fd)

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _holder(fd: int) -> str:
    try:
        who = json.loads(os.pread(fd, 4096, 0).decode())
        return f"pid {int(who['pid'])} on host {str(who['host'])[:100]}, since {str(who['since'])[:40]}"
    except (ValueError, KeyError, TypeError):  # written this very moment, or not by cotmi
        return "holder unknown"


@dataclass
class RunDir:
    path: Path
    resume: Path | None      # the checkpoint --resume continues from
    replace: bool            # --overwrite: the run in ``path`` is replaced once this one starts
    fresh: bool = True       # ``path`` held nothing when the run was chosen (absent or empty)
    lock: RunLock | None = None  # rank 0's, once taken

    def release(self) -> None:
        """Let the directory go: the run ended, or never started (then nothing was written)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def claim(self, env: DistEnv, config_yaml: str, ds_config: dict, tokenizer) -> None:
        """The run is known to start: create (or take over) the directory and write its first files.
        A resumed run rewrites config.yaml and ds_config.json (they describe the latest launch)."""
        on_main(lambda: self._claim(config_yaml, ds_config, tokenizer), env)

    def _claim(self, config_yaml: str, ds_config: dict, tokenizer) -> None:
        path, created = self.path, not self.path.exists()
        path.mkdir(parents=True, exist_ok=True)
        if self.lock is None:  # no run was locked here when the run was chosen: take it now
            self._take_over()
        aside = path / REPLACED
        if self.replace:  # the old run's entries move aside (renames: instant), and come back on a failure
            shutil.rmtree(aside, ignore_errors=True)
            aside.mkdir()
            for entry in cotmi_entries(path):
                if entry != aside:
                    entry.rename(aside / entry.name)
        try:
            if not (path / MARKER).is_file():
                write_json_atomic(path / MARKER, {
                    "format": MARKER_FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "written_by": "cotmi train; --overwrite replaces only a directory holding this file, "
                                  "and removes only what cotmi wrote there"}, durable=True)
            write_text_atomic(path / "config.yaml", config_yaml, durable=True)
            write_json_atomic(path / "ds_config.json", ds_config, durable=True)
            tokenizer.save_pretrained(path / "tokenizer")
        except OSError as e:
            self._undo(aside, created)
            raise UsageError(f"{write_problem(e, path)}; the run did not start") from None
        if self.replace:
            shutil.rmtree(aside)
            print(f"--overwrite: replaced the previous run in {path} (files cotmi did not write are kept)",
                  flush=True)

    def _take_over(self) -> None:
        """Lock a directory no run had locked when this one was chosen; one that another run has
        started in since is not written into."""
        self.lock = RunLock.take(self.path)
        if (self.path / MARKER).is_file() and self.resume is None and not self.replace:
            self.release()
            raise UsageError(f"--output_dir {self.path}: another cotmi train started a run there while this one "
                             "was starting; choose another directory, or continue it with --resume auto")

    def _undo(self, aside: Path, created: bool) -> None:
        """The first write failed: the directory goes back to what it was (empty, or not there; an
        old run being replaced back in place), so the run did not start."""
        self.release()
        if self.fresh:
            for entry in self.path.iterdir():
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
            if created:
                self.path.rmdir()
        elif self.replace:
            for entry in cotmi_entries(self.path):
                if entry != aside:
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
            for entry in aside.iterdir():
                entry.rename(self.path / entry.name)
            aside.rmdir()


def choose_run_dir(cfg: TrainConfig, env: DistEnv) -> RunDir:
    """Rank 0 picks the run directory (a timestamp would differ between ranks), with --resume the
    checkpoint to continue from, and whether the directory's old run is to be replaced
    (--overwrite); every rank gets the same answer or the same error. Rank 0 locks a directory that
    a run has locked before (a live run refuses here, before any work); others are locked by
    ``RunDir.claim``. Nothing is written."""
    decision, lock = None, None
    if env.is_main:
        try:
            path = _path(cfg)
            _check_writable(path)  # before data preparation, not found out after it
            if (path / LOCK).is_file():
                lock = RunLock.take(path)
            resume = _resume(cfg, path)
            replace = cfg.overwrite and _holds_other_run(path, resume)
            decision = json.dumps({"run": str(path), "resume": None if resume is None else str(resume),
                                   "replace": replace, "fresh": not path.exists() or not any(path.iterdir())})
        except UsageError as e:
            if lock is not None:
                lock.release()
            decision = json.dumps({"error": str(e)})
    answer = json.loads(broadcast_str(decision, env))
    if "error" in answer:
        raise UsageError(answer["error"])
    return RunDir(Path(answer["run"]), None if answer["resume"] is None else Path(answer["resume"]),
                  answer["replace"], answer["fresh"], lock)


def _path(cfg: TrainConfig) -> Path:
    if cfg.output_dir is not None:
        return Path(cfg.output_dir)
    if cfg.resume is not None:  # --resume auto needs --output_dir (config.py)
        own_run = run_dir_of(resolve(cfg.resume, "--resume"))
        if own_run is None:
            raise UsageError(f"--resume {cfg.resume} is not inside a run directory; give --output_dir")
        return own_run
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", dataset_name(cfg.dataset))
    return Path(f"runs/{name}-{cfg.mode}-{time.strftime('%Y%m%d-%H%M%S')}")


def _resume(cfg: TrainConfig, path: Path) -> Path | None:
    """The checkpoint to continue from, checked whole (rank 0 alone reads every byte)."""
    if cfg.resume == "auto":  # this directory is the run: continue it, or start it if it has no checkpoint
        resume = latest_in_run(path)
        if resume is not None:
            read_checkpoint(resume, "--resume auto:", requires=RESUME_FIELDS)
        return resume
    resume = None
    if cfg.resume is not None:
        resume = resolve(cfg.resume, "--resume")
        read_checkpoint(resume, "--resume", requires=RESUME_FIELDS)
        own_run = run_dir_of(resume)
        if own_run is not None and path.resolve() == own_run.resolve():
            return resume
    if path.is_dir() and any(path.iterdir()) and not cfg.overwrite:
        raise UsageError(f"--output_dir {path} already holds a run; choose another directory, pass "
                         "--overwrite true, or continue it with --resume auto")
    return resume


def _holds_other_run(path: Path, resume: Path | None) -> bool:
    """Whether ``path`` is non-empty and is not the run being continued. A non-empty directory
    without the marker is refused: --overwrite never empties a folder cotmi train did not make."""
    if not path.is_dir() or not any(path.iterdir()):
        return False
    if resume is not None and path.resolve() in (resume.resolve(), *resume.resolve().parents):
        if run_dir_of(resume) is not None and run_dir_of(resume).resolve() == path.resolve():
            return False  # continuing this run
        raise UsageError(f"--overwrite would delete --resume {resume}, which lies inside --output_dir {path}")
    if not (path / MARKER).is_file():
        raise UsageError(f"--output_dir {path} is not empty and holds no run cotmi train made (no {MARKER}); "
                         "--overwrite only replaces such a run directory: choose a new or empty directory")
    return True


def _check_writable(path: Path) -> None:
    """The run directory exists as a writable folder or can be created: checked before data
    preparation, not found out after it."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"--output_dir {path} exists and is not a directory")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"--output_dir {path}: cannot be created ({existing} is not a directory)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--output_dir {path}: cannot be {'written' if existing == path else 'created'} "
                         f"(no write permission on {existing})")
