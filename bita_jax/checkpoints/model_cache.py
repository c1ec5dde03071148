"""On-disk cache of artifacts derived from a GGUF file: where it lives and how it is written.

Each GGUF file gets one cache directory, `cache_entry(path)`, under
`{root}/gguf/{stem}-{hash of the absolute path}-{file_key}`. The key covers the file's size, mtime
and first and last MiB, the gguf package version and `CACHE_FORMAT`, so a changed file or a new
converter simply misses. The root is `BITA_JAX_CACHE` if set, else `$XDG_CACHE_HOME/bita_jax`,
else `~/.cache/bita_jax`; `BITA_JAX_NO_CACHE=1` (or a big-endian host) turns the cache off
(`cache_root` is then None).

Files are written atomically (`AtomicFile`, `write_cache_file`): under a temporary name, renamed
into place when complete, so a killed process never leaves a partial file; committing a file
prunes the older entries of the same GGUF path and stale temp files. The cache is best effort:
a file that cannot be written or read only warns (`CacheWarning`, see `warn_unwritable` and
`warn_unreadable`); the caller goes on without it, or rebuilds it.

What goes into an entry is up to its users: the float32 tensors and config
(bita_jax/checkpoints/gguf_loader.py) and the tokenizer (bita_jax/checkpoints/tokenizer.py).

Compiled XLA programs go to `{root}/xla` (`enable_xla_cache`, JAX's persistent compilation
cache, keyed by JAX on the program, the jax version, the backend and XLA's flags): a second run of
the same command skips XLA's compile (README's first command on 2 CPU cores: 39.5 s -> 28 s).
`BITA_JAX_NO_XLA_CACHE=1` turns off this part alone; a `jax_compilation_cache_dir` the user set
(`JAX_COMPILATION_CACHE_DIR`) is left as it is. JAX writes these files itself, not atomically: an
entry cut short by a kill is read as a miss (the program is compiled, the run is correct) and is
never rewritten, so deleting `{root}/xla` is the cure for a first call that stays slow.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
import pathlib
import re
import shutil
import sys
import tempfile
import time
import warnings
from typing import BinaryIO

CACHE_ENV = "BITA_JAX_CACHE"
NO_CACHE_ENV = "BITA_JAX_NO_CACHE"
NO_XLA_CACHE_ENV = "BITA_JAX_NO_XLA_CACHE"
# Bump whenever a cached artifact would change (conversion code, file layout): old entries then
# simply stop matching.
CACHE_FORMAT = 1
_KEY_CHUNK = 1 << 20  # the key hashes the file's first and last MiB
_STALE_TMP_S = 3600.0  # a *.tmp file untouched this long was left by a killed process


class CacheWarning(RuntimeWarning):
    """A cache entry was unreadable (and is rebuilt) or could not be written (load goes on)."""


def _env_flag(name: str) -> bool:
    """Whether environment variable `name` is set to anything but empty/0/false/no/off."""
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def cache_root() -> pathlib.Path | None:
    """The cache directory, or None when `BITA_JAX_NO_CACHE` is set (to anything but 0/false)."""
    if _env_flag(NO_CACHE_ENV):
        return None
    if sys.byteorder != "little":  # cached files are little-endian float32
        return None
    if os.environ.get(CACHE_ENV):
        return pathlib.Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (pathlib.Path(xdg).expanduser() if xdg else pathlib.Path.home() / ".cache") / "bita_jax"


@functools.cache
def _gguf_version() -> str:
    try:
        return importlib.metadata.version("gguf")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def file_key(path: str | os.PathLike) -> str:
    """A cheap identity of a file's contents: size, mtime and its first and last MiB (hex sha256).

    Also covers `CACHE_FORMAT` and the gguf version (the dequantizer), so none of those can
    change without the key changing.
    """
    st = os.stat(path)
    h = hashlib.sha256(f"bita_jax-gguf/{CACHE_FORMAT}/{_gguf_version()}/{st.st_size}/"
                       f"{st.st_mtime_ns}/".encode())
    with open(path, "rb") as f:
        h.update(f.read(_KEY_CHUNK))
        if st.st_size > _KEY_CHUNK:
            f.seek(max(_KEY_CHUNK, st.st_size - _KEY_CHUNK))
            h.update(f.read(_KEY_CHUNK))
    return h.hexdigest()


def cache_entry(path: str | os.PathLike) -> pathlib.Path | None:
    """The cache directory for artifacts derived from GGUF file `path` (not created here).

    Named `{stem}-{hash of the absolute path}-{file_key}`: another file, or the same path with new
    contents, gets another directory. Writing an entry removes the older ones of the same path.

    Returns:
      None when caching is disabled or `path` is not a readable file.
    """
    root = cache_root()
    path = pathlib.Path(path)
    if root is None or not path.is_file():
        return None
    try:
        key = file_key(path)
    except OSError:
        return None
    where = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", path.stem)[:48]
    return root / "gguf" / f"{stem}-{where}-{key[:24]}"


def _remove_stale_entries(entry: pathlib.Path) -> None:
    """Deletes the other entries of the same GGUF path (older contents) and stale temp files."""
    prefix = entry.name[:-24]
    try:
        for other in entry.parent.iterdir():
            if (other != entry and other.name.startswith(prefix)
                    and re.fullmatch(r"[0-9a-f]{24}", other.name[len(prefix):])):
                shutil.rmtree(other, ignore_errors=True)
        now = time.time()
        for tmp in entry.glob("*.tmp"):
            if now - tmp.stat().st_mtime > _STALE_TMP_S:
                tmp.unlink(missing_ok=True)
    except OSError:
        pass


class AtomicFile:
    """A file written under a temporary name next to `dest`, renamed onto `dest` by `commit`.

    A killed process leaves at most a `*.tmp` file (removed later), never a partial `dest`.

    Raises:
      OSError: the directory cannot be created or written.
    """

    def __init__(self, dest: pathlib.Path):
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
        self.dest = dest
        self.file: BinaryIO = os.fdopen(fd, "wb")

    def commit(self) -> None:
        self.file.close()
        os.replace(self._tmp, self.dest)
        _remove_stale_entries(self.dest.parent)

    def abort(self) -> None:
        try:
            self.file.close()
        except OSError:
            pass
        pathlib.Path(self._tmp).unlink(missing_ok=True)


def write_cache_file(dest: pathlib.Path, data: bytes) -> bool:
    """Atomically writes `data` to cache file `dest`; warns (and returns False) if it cannot."""
    try:
        f = AtomicFile(dest)
    except OSError as e:
        warn_unwritable(dest, e)
        return False
    try:
        f.file.write(data)
        f.commit()
    except OSError as e:
        f.abort()
        warn_unwritable(dest, e)
        return False
    return True


def warn_unwritable(dest: pathlib.Path, e: Exception) -> None:
    """Warns that cache file `dest` could not be written (the load goes on without it)."""
    warnings.warn(f"cannot write cache file {dest} ({type(e).__name__}: {e}); continuing without "
                  f"it (set {NO_CACHE_ENV}=1 to disable the cache)", CacheWarning, stacklevel=3)


def warn_unreadable(file: pathlib.Path, e: Exception) -> None:
    """Warns that cache file `file` is unreadable and deletes it (it is about to be rebuilt)."""
    warnings.warn(f"ignoring unreadable cache file {file} ({type(e).__name__}: {e}); rebuilding "
                  "it from the GGUF file", CacheWarning, stacklevel=3)
    try:
        file.unlink(missing_ok=True)
    except OSError:
        pass


def enable_xla_cache() -> pathlib.Path | None:
    """Turns on JAX's persistent compilation cache under `{cache_root()}/xla`, once per process.

    Call it before the first compile: JAX decides whether a process uses the cache at its first
    compile. Programs that took at least `jax_persistent_cache_min_compile_time_secs` (1 s by
    default) to compile are stored; a later process compiling the same program on the same
    jax, backend and flags loads it instead.

    Returns:
      The directory in use (the user's own `jax_compilation_cache_dir` if one is set), or None
      when the cache is off (`BITA_JAX_NO_CACHE`, `BITA_JAX_NO_XLA_CACHE`) or unwritable.
    """
    import jax

    if jax.config.jax_compilation_cache_dir:
        return pathlib.Path(jax.config.jax_compilation_cache_dir)
    root = cache_root()
    if root is None or _env_flag(NO_XLA_CACHE_ENV):
        return None
    path = root / "xla"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        warn_unwritable(path, e)
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    return path
