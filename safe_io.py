"""Low-level file safety shared by the entry points: crash-safe (atomic, durable) writes and their temporary-file
clean-up, appending to and reading jsonl logs, the checks that an output folder can be written and the one output
rule of every script that writes a single file (check_output_file), and the exclusive lock a training run holds on
its folder.

What the files of a training run are, and the order an epoch writes them, is run_folder.py's concern, not this
module's; command-line checks of flag values are in cli.py.
"""
import contextlib
import datetime
import hashlib
import json
import os
import re
import tempfile
import time

import torch

from cli import UserInputError


def _fsync_directory(directory):
    """Make a rename durable: the directory entry must reach the disk too (POSIX only)."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _current_umask():
    """The process umask (reading it means setting it; it is put back at once)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


@contextlib.contextmanager
def replacing(path):
    """Yield a temporary path next to path to write the new file into; on success make it durable and rename it
    onto path, with the mode open() would give (0666 less the umask; mkstemp creates 0600).

    Readers see either the old file or the complete new one. On any failure (disk full, interrupt) the temporary
    file is removed and the old file is left untouched. Temporary names follow TEMP_FILE_PATTERN.
    """
    directory = os.path.dirname(os.path.abspath(path))
    with naming(path):
        fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp_path
        fd = os.open(tmp_path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp_path, 0o666 & ~_current_umask())
        os.replace(tmp_path, path)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp_path)
        os_error = _first_os_error(error)
        if os_error is not None:
            raise OSError(os_error.errno, os_error.strerror, os.fspath(path)) from error
        raise
    with naming(directory):
        _fsync_directory(directory)


def _replace_atomically(path, write):
    """Write through write(binary_file) into path, crash-safe (see replacing)."""
    with replacing(path) as tmp_path, open(tmp_path, "wb") as f:
        write(f)


# What replacing() names its temporary files: "." + the target's name + "." + mkstemp's 8 random characters.
TEMP_FILE_PATTERN = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")


def remove_stale_temp_files(directory):
    """Delete the temporary files that replacing() left in directory when a process was killed mid-write (SIGKILL,
    power loss); nothing else is touched. Call it only while holding the directory's lock. Returns their names."""
    stale = sorted(name for name in os.listdir(directory)
                   if TEMP_FILE_PATTERN.fullmatch(name) and os.path.isfile(os.path.join(directory, name)))
    for name in stale:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(directory, name))
    return stale


@contextlib.contextmanager
def naming(path):
    """Re-raise an OSError as one naming path (a failed write names no file, a failed temporary file names itself),
    so that its one-line report names the file the user knows."""
    try:
        yield
    except OSError as error:
        raise OSError(error.errno, error.strerror or str(error), os.fspath(path)) from error


def _first_os_error(error):
    """The OSError behind a failure, if any: torch.save reports a full disk as a RuntimeError about zip positions,
    raised while handling the original OSError."""
    while error is not None:
        if isinstance(error, OSError):
            return error
        error = error.__context__
    return None


def save_atomic(obj, path):
    """torch.save(obj, path), crash-safe: path holds either the previous file or the complete new one."""
    _replace_atomically(path, lambda f: torch.save(obj, f))


def write_text_atomic(path, text):
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path, data):
    _replace_atomically(path, lambda f: f.write(data))


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def append_jsonl(path, record):
    """Append one JSON line and make it durable. A crash mid-append can only tear that line; the next append
    drops such a torn tail, so every earlier line stays intact and the file stays one record per line."""
    line = (json.dumps(record) + "\n").encode("utf-8")
    with naming(path), open(path, "a+b") as f:
        f.seek(0)
        content = f.read()
        complete = content.rfind(b"\n") + 1
        if complete < len(content):
            f.truncate(complete)
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def _nearest_existing(path):
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def _check_can_create_files_in(directory, flag, path):
    """Create and remove a probe file in directory: unlike os.access this also sees read-only mounts, root's
    limits and file systems that take no new files (/proc). The probe is named like replacing()'s temporary files,
    so a kill in between leaves nothing that remove_stale_temp_files would not clean."""
    try:
        fd, probe = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path) or 'probe'}.", suffix=".tmp")
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):  # a run holding the folder may have cleaned it up already
            os.remove(probe)
    except OSError as error:
        raise UserInputError(f"{flag} {path}: cannot write in {directory}: {error.strerror}") from None


def prepare_output_dir(path, flag="--output-dir"):
    """Create the folder path (and missing parents), or stop with one line saying why it cannot be written."""
    existing = _nearest_existing(path)
    if not os.path.isdir(existing):
        what = "is a file" if existing == os.path.abspath(path) else f"cannot be created: {existing} is a file"
        raise UserInputError(f"{flag} {path} {what}, not a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        raise UserInputError(f"{flag} {path}: cannot create it: {error.strerror}") from None
    _check_can_create_files_in(path, flag, path)


# The files of a training run (train.py's checkpoints and log): no script writing a single file may replace one,
# or write under their names, whatever it is told.
TRAINING_RUN_FILE = re.compile(r"checkpoint\.pth|log\.jsonl|model_(\d+|best)\.pth")


def check_output_file(path, flag="--output", *, inputs=(), kind=None, is_kind=None, overwrite=False):
    """The one output rule of every script that writes a single file, checked before the work: stop with one
    line unless path may be written.

    - path is none of inputs ((flag, path) pairs) and not a training run's file (TRAINING_RUN_FILE);
    - an existing path is replaced only when is_kind(path) says it holds what this script writes (kind, e.g.
      "an ONNX file written by export.py"), or with overwrite (the script's --overwrite); a folder or any other
      non-regular file never;
    - its folder exists and a file can be created there (a probe, see _check_can_create_files_in).

    A failure of the final write itself is reported by replacing() as an OSError naming path.
    """
    for input_flag, input_path in inputs:
        if same_file(path, input_path):
            raise UserInputError(f"{flag} {path} is the {input_flag} input {input_path}: choose another file name")
    if TRAINING_RUN_FILE.fullmatch(os.path.basename(path)):
        raise UserInputError(f"{flag} {path}: {os.path.basename(path)} is the name of a training run's file; "
                             "choose another file name")
    if os.path.isdir(path):
        raise UserInputError(f"{flag} {path} is a folder, not a file name")
    if os.path.lexists(path):
        if not os.path.isfile(path):
            raise UserInputError(f"{flag} {path} exists and is not a regular file: choose another file name")
        if not overwrite and not (is_kind is not None and is_kind(path)):
            raise UserInputError(f"{flag} {path} already exists and is not {kind}: choose another file name, or "
                                 "add --overwrite to replace it")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise UserInputError(f"{flag} {path}: the folder {directory} does not exist")
    _check_can_create_files_in(directory, flag, path)


def same_file(a, b):
    """Whether paths a and b name one file or folder (through links too); False when either does not exist."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


LOCK_NAME = ".train.lock"


class OutputDirLocked(UserInputError):
    """Another live process holds the output folder's lock."""


def lock_output_dir(directory):
    """Take an exclusive lock on directory for as long as the returned file stays open (the process's life).

    fcntl.flock locks go away with the process however it ends (even SIGKILL), so a lock file left behind never
    blocks a later run. The holder writes its pid, host and start time into the file so that a second run can say
    who holds it. POSIX only.
    """
    import fcntl
    import socket

    path = os.path.join(directory, LOCK_NAME)
    lock_file = open(path, "a+", encoding="utf-8")
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(lock_file)
        lock_file.close()
        raise OutputDirLocked(f"{directory} is in use by another run ({holder}); wait for it to end or choose "
                              "another --output-dir") from None
    lock_file.truncate(0)
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    lock_file.write(f"pid {os.getpid()} on {socket.gethostname()}, started {started}\n")
    lock_file.flush()
    return lock_file


def _read_holder(lock_file, attempts=20):
    """The holder's line; it is written just after the lock is taken, so give a starting holder a moment."""
    for _ in range(attempts):
        lock_file.seek(0)
        holder = " ".join(lock_file.read().split())
        if holder:
            return holder
        time.sleep(0.05)
    return "a process that is starting"


def read_jsonl_lines(path, is_record=lambda record: True):
    """(records, unreadable) of a jsonl file: records are the lines holding a JSON object that is_record accepts,
    as (record, line without its newline); unreadable are the other complete lines as bytes, in file order (invalid
    UTF-8, not JSON, another value or record), for the caller to keep. An unterminated last line that is not a
    record is what an interrupted append leaves and is in neither. A missing file reads as empty."""
    if not os.path.exists(path):
        return [], []
    records, unreadable = [], []
    for raw in read_bytes(path).splitlines(keepends=True):
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            record = None
        if isinstance(record, dict) and is_record(record):
            records.append((record, raw.decode("utf-8").rstrip("\r\n")))
        elif raw.endswith(b"\n") and raw.strip():
            unreadable.append(raw.rstrip(b"\r\n"))
    return records, unreadable


def sha256_of_file(path, chunk_size=1 << 20):
    """The hex SHA-256 of a file's bytes, read in chunks (a checkpoint can be hundreds of megabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()
