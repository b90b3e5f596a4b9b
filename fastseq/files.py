"""Files written so that a crash never leaves a half-written one under its real name, the lock of a
directory that one run uses, fingerprints of data files, and the safetensors half of a Hugging Face
model directory. Nothing here knows the models: a model is anything with `state_dict()`,
`tied_parameters()`, `hf_config()`."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
SHARD_RE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
# The smallest --max-shard-size: below it every shard is one tensor, whatever the model (0 wrote a
# file per tensor). 10 KB keeps the small shards that tiny test models are split into (20KB).
MIN_SHARD_SIZE = 10_000
_MAX_SHARDS = 99_999  # what the five digits of a shard's name count
LOCK_FILE = ".fastseq.lock"
# What a full disk or a file-size limit (`ulimit -f`) raises: a user's problem, not fastseq's.
DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
_DISK_FULL_TEXT = ("No space left on device", "File too large", "Disk quota exceeded", "os error 28", "os error 27",
                   "os error 122")  # fmt: skip
log = logging.getLogger("fastseq.files")


def parse_size(size: int | str, what: str = "max_shard_size") -> int:
    """Bytes from 5GB, 500MB, 2GiB or an int, at least `MIN_SHARD_SIZE`."""
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", size, flags=re.IGNORECASE)
        if not match:
            raise ValueError(f"{what} {size!r} is not a size; write it like 5GB, 500MB or 2GiB")
        units = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
        value = int(float(match.group(1)) * units[(match.group(2) or "B").lower()])
    if value < MIN_SHARD_SIZE:
        raise ValueError(f"{what} {size!r} is below the smallest shard size, 10KB ({MIN_SHARD_SIZE} bytes): "
                         "smaller shards only split the weights into a file per tensor; pass a size like 5GB or "
                         "500MB")  # fmt: skip
    return value


def _new_file_mode() -> int:
    """The mode `open` gives a new file: 0o666 less the process's umask (read from /proc where it is
    there, so that the umask is never changed under another thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """safetensors' `save_file` at `path`, the file then given the mode `open` gives a new one:
    safetensors writes 0600, which leaves the weights unreadable to the other users of a shared machine
    that can read every other file of the run."""
    save_file(tensors, str(path), metadata=metadata)
    with contextlib.suppress(OSError):  # a filesystem without permission bits keeps what it gives
        os.chmod(path, _new_file_mode())


def atomic_write(target: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` to a temporary name beside `target`, synced, then renamed onto it. An OS error that
    names no file (a write past `ulimit -f` says only "File too large") names `target`."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except OSError as err:
        if err.filename is None and err.errno is not None:  # raised by the OS (an errno), naming no file
            err.filename = str(target)
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def copy_file(source: Path, target: Path) -> None:
    """`source`'s bytes at `target`, written atomically (`atomic_write`)."""
    atomic_write(target, lambda tmp: shutil.copyfile(source, tmp))


def write_json(target: Path, data: dict) -> None:
    atomic_write(target, lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))


def atomic_directory(target: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` fills a temporary directory beside `target`, which then replaces `target`."""
    tmp = target.with_name(f".{target.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write(tmp)
    publish_directory(tmp, target)


def publish_directory(tmp: Path, target: Path) -> None:
    """Rename a finished temporary directory onto `target` (an older `target` is removed after).
    Signals wait until both renames are done, so a forced exit never leaves `target` missing."""
    old = target.with_name(f".{target.name}.old")
    if old.exists():
        shutil.rmtree(old)
    with _signals_deferred():
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
    if old.exists():
        shutil.rmtree(old)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP are held (delivered after the block) in the main thread."""
    deferred = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, deferred)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def utf8_problem(path: str | os.PathLike) -> str | None:
    """Why safetensors cannot open files under `path` (its bytes are not UTF-8: it takes paths as text),
    with the path shown with its stray bytes escaped; None for a UTF-8 path."""
    raw = os.fsencode(path)  # as given: a relative path is opened relative to a directory of any name
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        shown = raw.decode("utf-8", "backslashreplace")
        return f"{shown} is not a UTF-8 path, and safetensors opens only UTF-8 paths"
    return None


def check_apart(
    output: str | os.PathLike, output_flag: str, inputs: dict[str, str | os.PathLike | None], why: str
) -> None:
    """The one rule for where a command writes: `output` (named `output_flag`) may not be, hold or lie
    inside an input (`inputs`: flag -> a path, or a hub id, which is its snapshot in the Hugging Face
    cache), nor lie inside that cache (`huggingface_hub` owns it: its files are links into shared
    blobs). `why` ends the error line: what the command would do there, and the fix."""
    from .hub import cache_dir, cached_directory

    out = Path(os.path.realpath(output))
    cache = Path(os.path.realpath(cache_dir()))
    if out == cache or cache in out.parents:
        raise ValueError(f"{output_flag} {output} lies inside the Hugging Face cache ({cache_dir()}), which "
                         f"huggingface_hub owns; {why}")  # fmt: skip
    for flag, value in inputs.items():
        if value is None:
            continue
        path = Path(value) if Path(value).exists() else cached_directory(str(value))
        if path is None:
            continue
        path = Path(os.path.realpath(path))
        shown = value if path == Path(os.path.realpath(value)) else f"{value} ({path})"
        if path == out:
            relation = "is"
        elif out in path.parents:
            relation = "holds"
        elif path in out.parents:
            relation = "lies inside"
        else:
            continue
        raise ValueError(f"{output_flag} {output} {relation} {flag} {shown}; {why}")


def is_disk_full(err: BaseException) -> bool:
    """Whether `err` says the disk (or the quota, or the file-size limit) is full. safetensors' own
    error type carries the OS error only in its text."""
    if isinstance(err, OSError) and err.errno in DISK_FULL:
        return True
    return any(text in str(err) for text in _DISK_FULL_TEXT)


class DiskFull(ValueError):
    """The disk (or the quota, or the file-size limit) is full: a user's problem, said in one line."""


def reason(err: BaseException) -> str:
    """An error in a few words, for a note on another one."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return " ".join(str(err).split())[:200] or type(err).__name__


def disk_full(err: BaseException, writing: Path, what: str, needed: int, advice: str) -> DiskFull:
    """The line for a full disk (or quota, or file-size limit) while writing `writing`, whatever
    writes it (a checkpoint, `fastseq convert`): the OS's words, the space `what` needs (`needed`
    bytes), the space free there (or the file-size limit), and `advice`."""
    where = next(p for p in (Path(writing), *Path(writing).parents) if p.exists())
    limit = "a file of it is larger than the file-size limit (ulimit -f)" if "too large" in str(err).lower() else (
        f"{shutil.disk_usage(where).free / 2**20:.1f} MiB is free there")  # fmt: skip
    return DiskFull(f"no space left to write {writing} ({reason(err)}): {what} needs about {needed / 2**20:.1f} MiB "
                    f"and {limit}; {advice}")  # fmt: skip


def directory_size(path: Path) -> int:
    """Bytes of the files under `path` (0 if it does not exist)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) if Path(path).is_dir() else 0


# ---- the lock of a directory a run uses -----------------------------------------------------------


def _process_start(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, from /proc), or None where unknown: a
    PID reused by another process after the holder died has another start time."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the command name


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return start is None or _process_start(pid) in (None, start)


_HELD: list[DirectoryLock] = []  # the locks this process took and has not released, oldest first


@dataclass(eq=False)
class DirectoryLock:
    """`DIR/.fastseq.lock`, holding the host, PID and start time of the process that uses DIR. It is
    created with O_EXCL (so of two runs exactly one gets it) and removed by `release`."""

    path: Path
    holder: dict

    @classmethod
    def acquire(cls, directory: Path, what: str = "--output-dir") -> DirectoryLock:
        path = Path(directory) / LOCK_FILE
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "start": _process_start(os.getpid())}
        for _ in range(3):  # a stale lock is taken over at most a couple of times before giving up
            # Signals wait: never an empty lock file left by a Ctrl-C between the open and the write,
            # and never a lock taken but not yet in `_HELD` (where `DirectoryLock.scope` releases it).
            with _signals_deferred():
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                except FileExistsError:
                    lock = None
                else:
                    with os.fdopen(fd, "w") as f:
                        f.write(json.dumps(holder) + "\n")
                    lock = cls(path, holder)
                    _HELD.append(lock)
            if lock is None:
                cls._take_over_if_stale(path, holder, what)
                continue
            return lock
        raise ValueError(f"{what} {directory}: could not take its lock {path}; another run keeps taking it")

    @staticmethod
    def _take_over_if_stale(path: Path, holder: dict, what: str) -> None:
        """Remove the lock of a process that no longer runs on this host; refuse any other."""
        try:
            text = path.read_text()
            other = json.loads(text)
            host, pid, start = other["host"], int(other["pid"]), other.get("start")
            if not 0 < pid < 2**31:  # not a process ID (0 and negative ones name process groups to os.kill)
                raise ValueError(pid)
        except FileNotFoundError:
            return  # released meanwhile: try again
        except (OSError, ValueError, KeyError, TypeError):
            raise ValueError(
                f"{what} {path.parent} is locked by {path} (unreadable: another run may be starting); if no run "
                f"uses the directory, remove {path}"
            ) from None
        if host != holder["host"] or _alive(pid, start):
            raise ValueError(
                f"{what} {path.parent} is in use by another run (PID {pid} on {host}, lock {path}); wait for it to "
                f"end or choose another {what}; if that run is gone, remove {path}"
            )
        # Renamed away, then checked: if another process replaced the stale lock with its own in
        # between, it is put back and this run is refused.
        moved = path.with_name(f"{path.name}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            os.replace(path, moved)
        except FileNotFoundError:
            return
        if moved.read_text() != text:
            with contextlib.suppress(FileExistsError):
                os.link(moved, path)
            moved.unlink()
            raise ValueError(f"{what} {path.parent} is in use by another run (lock {path}); choose another {what}")
        moved.unlink()
        log.warning("%s %s: took over the lock of PID %d on %s, which is no longer running", what, path.parent, pid,
                    host)  # fmt: skip

    @staticmethod
    @contextlib.contextmanager
    def scope() -> Iterator[None]:
        """Every lock this process takes inside the block is released when the block ends, however it
        ends: a signal that arrives just as a lock is taken, before its taker holds it, leaves no lock
        behind."""
        before = len(_HELD)
        try:
            yield
        finally:
            with _signals_deferred():
                for lock in _HELD[before:]:
                    lock.release()

    def release(self) -> None:
        """Remove the lock if this process holds it (a copy sent to another rank does not)."""
        if self in _HELD:
            _HELD.remove(self)
        if self.holder["pid"] != os.getpid():
            return
        try:
            if json.loads(self.path.read_text()) == self.holder:
                self.path.unlink()
        except (OSError, ValueError):
            pass


# ---- fingerprints of data ---------------------------------------------------------------------------


def _cache_file() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "fastseq" / "fingerprints.json"


_CACHE_ENTRIES = 1000  # the newest fingerprints kept; each is one short line


def _file_digest(file: Path, cache: dict) -> str:
    """SHA-256 of every byte of `file`, from `cache` when its size, mtime and inode are those hashed."""
    stat = file.stat()
    key = str(file.resolve())
    stamp = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
    cached = cache.get(key)
    if isinstance(cached, dict) and cached.get("stamp") == stamp and isinstance(cached.get("sha256"), str):
        return cached["sha256"]
    digest = hashlib.sha256()
    with file.open("rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    cache.pop(key, None)
    cache[key] = {"stamp": stamp, "sha256": digest.hexdigest()}
    return digest.hexdigest()


def fingerprint(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, or of a directory's files (every file under it, in sorted order,
    each with its path relative to the directory). It does not depend on where the data lies.
    Each file's hash is cached (`$XDG_CACHE_HOME/fastseq/fingerprints.json`) under its size, mtime
    and inode, so a large corpus is hashed once, not at every start."""
    path = Path(path)
    cache_file = _cache_file()
    try:
        cache = json.loads(cache_file.read_text())
        cache = cache if isinstance(cache, dict) else {}
    except (OSError, ValueError, RecursionError):  # a damaged cache only costs time
        cache = {}
    before = dict(cache)
    if path.is_dir():
        digest = hashlib.sha256(b"directory")
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(file.relative_to(path).as_posix().encode() + b"\0" + _file_digest(file, cache).encode())
        result = digest.hexdigest()
    else:
        result = _file_digest(path, cache)
    if cache != before:
        kept = dict(list(cache.items())[-_CACHE_ENTRIES:])
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(cache_file, lambda tmp: tmp.write_text(json.dumps(kept)))
        except OSError as err:  # a cache that cannot be written only costs time
            log.debug("fingerprint cache %s not written: %s", cache_file, err)
    return result


def _shards(tensors: dict[str, torch.Tensor], limit: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    return shards


def save_pretrained(model, path: str | os.PathLike, *, max_shard_size: int | str = "5GB") -> None:
    """Write config.json and safetensors weights that `transformers` and fastseq both load.

    Tied aliases are not stored (as Hugging Face does). Weights above
    `max_shard_size` are split into `model-0000k-of-0000n.safetensors` with an index.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    aliases = model.tied_parameters()
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items() if k not in aliases}
    shards = _shards(tensors, parse_size(max_shard_size))
    if len(shards) > _MAX_SHARDS:
        raise ValueError(f"max_shard_size {max_shard_size!r} splits the weights into {len(shards):,} shards, more "
                         f"than the {_MAX_SHARDS:,} that shard names count; pass a larger size")  # fmt: skip
    metadata = {"format": "pt"}
    written: set[str] = set()
    if len(shards) == 1:
        atomic_write(path / SAFE_WEIGHTS, lambda tmp: save_safetensors(shards[0], tmp, metadata))
        written.add(SAFE_WEIGHTS)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            atomic_write(path / name, lambda tmp, shard=shard: save_safetensors(shard, tmp, metadata))
            weight_map.update(dict.fromkeys(shard, name))
            written.add(name)
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        write_json(path / SAFE_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
        written.add(SAFE_INDEX)
    write_json(path / "config.json", model.hf_config())
    # Weights of an earlier save in another layout would shadow or contradict this one.
    for stale in path.iterdir():
        if stale.name not in written and (stale.name in (SAFE_WEIGHTS, SAFE_INDEX) or SHARD_RE.fullmatch(stale.name)):
            stale.unlink()
