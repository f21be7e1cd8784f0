"""Where files live: a local path, or an object on object storage (`s3://`, `gs://`), through `pyarrow.fs`.

Run directories, checkpoints and datasets all go through `Location`, one small path type, so the code that writes
a run does not care where the run is. Local files keep what POSIX gives: an atomic rename, append and flock. On
object storage a whole object is written by one upload, which readers see whole or not at all (S3 and GCS are
strongly consistent for a read after a write), and there is no append, rename or lock; `schemas.rundir` says how a
run copes. `file://` URIs are local paths. The S3 endpoint comes from the standard `AWS_ENDPOINT_URL`, a GCS
emulator's from `STORAGE_EMULATOR_HOST`; credentials from the usual AWS and Google variables and files (pyarrow
reads them).

Torch-free on purpose: the control plane imports it.
"""
from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path
from typing import Any, Optional
from urllib.parse import unquote, urlparse

from schemas.files import atomic_write

REMOTE_SCHEMES = ("s3", "gs")
ALIASES = {"gcs": "gs"}
SUPPORTED = "a local path, file://, s3:// or gs://"


class StorageError(ValueError):
    """A location that cannot be used (an unsupported scheme, a URI without a bucket)."""


def scheme_of(text: str) -> Optional[str]:
    """The URI scheme of `text` ('s3', 'gs', 'file', ...), or None for a plain path."""
    if "://" not in text:
        return None
    return text.split("://", 1)[0].lower()


def location_problem(text: str) -> Optional[str]:
    """Why `text` cannot be a location (an unsupported scheme, a URI without a bucket, a `file://` URI with a
    host, which would silently drop its first folder), or None."""
    scheme = scheme_of(text)
    if scheme is None:
        return None
    if scheme == "file":
        host = _bucket_and_key(text)[0]   # what comes before the path's first '/': empty for file:///PATH
        return None if host in ("", "localhost") else (f"{text!r} names the host {host!r}; write file:///ABSOLUTE/PATH "
                                                       "(three slashes) or a plain path")
    scheme = ALIASES.get(scheme, scheme)
    if scheme not in REMOTE_SCHEMES:
        return f"unsupported storage scheme '{scheme}://' in {text!r}; use {SUPPORTED}"
    if not _bucket_and_key(text)[0]:
        return f"{text!r} names no bucket; write {scheme}://BUCKET/PREFIX"
    return None


def _bucket_and_key(uri: str) -> tuple[str, str]:
    """('bucket', 'bucket/key') of an object-storage URI, split by hand: an object key may hold '#' or '?',
    which a URL parser would take for a fragment or a query."""
    rest = uri.split("://", 1)[1]
    return rest.split("/", 1)[0], rest.rstrip("/")


def check_location(text: str, field: str) -> None:
    """Refuse, in one line naming the field, what `location_problem` finds: never a local folder named after an
    unsupported scheme."""
    problem = location_problem(text)
    if problem:
        raise StorageError(f"{field}: {problem}")


def absolute(where: str) -> str:
    """A local path made absolute (a `file://` URI becomes one): Ray workers may run in another directory. An
    object-storage URI as it is."""
    loc = Location(where)
    return where if loc.remote else os.path.realpath(loc.uri)


@functools.lru_cache(maxsize=None)
def filesystem(scheme: str, bucket: str):
    """One pyarrow filesystem per bucket and process (made on first use, so a Location pickles as its URI)."""
    import pyarrow.fs as pafs

    emulator = os.environ.get("STORAGE_EMULATOR_HOST") if scheme == "gs" else None
    try:
        if emulator:  # Google's variable for a GCS emulator (as its client libraries read it): no credentials
            parsed = urlparse(emulator if "://" in emulator else f"http://{emulator}")
            return pafs.GcsFileSystem(endpoint_override=parsed.netloc, scheme=parsed.scheme, anonymous=True)
        return pafs.FileSystem.from_uri(f"{scheme}://{bucket}")[0]
    except Exception as e:  # pyarrow raises OSError or ArrowInvalid for a bad endpoint or region lookup
        raise OSError(f"{scheme}://{bucket}: cannot open the bucket ({str(e).splitlines()[0][:200]}); check "
                      "AWS_ENDPOINT_URL and the credentials") from None


class Location:
    """A file or folder: a local path (also usable wherever a path is, through `os.fspath`) or an object key."""

    __slots__ = ("uri",)

    def __init__(self, where: "str | Path | Location"):
        if isinstance(where, Location):
            self.uri = where.uri
            return
        text = str(where)
        scheme = scheme_of(text)
        if scheme is not None:
            check_location(text, "location")
        if scheme == "file":
            path = text.split("://", 1)[1]  # by hand, as object keys: a path may hold '#' or '?'
            text = unquote(path[len("localhost"):] if path.split("/", 1)[0] == "localhost" else path) or "/"
        elif scheme is not None:
            scheme = ALIASES.get(scheme, scheme)
            text = f"{scheme}://{text.split('://', 1)[1].rstrip('/')}"
        self.uri = text

    # ---- a path's vocabulary ------------------------------------------------------------------------------
    @property
    def remote(self) -> bool:
        return scheme_of(self.uri) is not None

    def __truediv__(self, part: str) -> "Location":
        if self.remote:
            return Location(f"{self.uri}/{str(part).strip('/')}")
        return Location(Path(self.uri) / part)

    @property
    def name(self) -> str:
        return self.uri.rstrip("/").rsplit("/", 1)[-1] if self.remote else Path(self.uri).name

    @property
    def parent(self) -> "Location":
        if self.remote:
            head, _, _ = self.uri.rpartition("/")
            return Location(head) if "://" in head and head.split("://", 1)[1] else self
        return Location(Path(self.uri).parent)

    def with_suffix(self, suffix: str) -> "Location":
        stem, dot, _ = self.name.rpartition(".")
        return self.parent / ((stem if dot else self.name) + suffix)

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"Location({self.uri!r})"

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, Location) and other.uri == self.uri

    def __hash__(self) -> int:
        return hash(self.uri)

    def __fspath__(self) -> str:
        if self.remote:
            raise TypeError(f"{self.uri} is on object storage, not a local path")
        return self.uri

    def __reduce__(self):
        return (Location, (self.uri,))

    @property
    def local(self) -> Path:
        return Path(os.fspath(self))

    def filesystem_and_key(self):
        """(the pyarrow filesystem, this object's path in it: bucket/key), for libraries that take both."""
        return self._fs()

    def _fs(self):
        bucket, key = _bucket_and_key(self.uri)
        return filesystem(scheme_of(self.uri), bucket), key

    def _info(self):
        fs, key = self._fs()
        try:
            return fs.get_file_info(key)
        except Exception as e:
            raise OSError(f"{self.uri}: cannot reach the object store ({str(e).splitlines()[0][:200]})") from None

    # ---- reading ------------------------------------------------------------------------------------------
    def exists(self) -> bool:
        if not self.remote:
            return os.path.exists(self.uri)
        import pyarrow.fs as pafs

        return self._info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        if not self.remote:
            return os.path.isfile(self.uri)
        import pyarrow.fs as pafs

        return self._info().type == pafs.FileType.File

    def size_mtime(self) -> Optional[tuple[int, float]]:
        """(size in bytes, modification time in seconds), or None where nothing is."""
        if not self.remote:
            try:
                st = os.stat(self.uri)
            except (FileNotFoundError, NotADirectoryError):
                return None
            return st.st_size, st.st_mtime
        import pyarrow.fs as pafs

        info = self._info()
        if info.type != pafs.FileType.File:
            return None
        return int(info.size or 0), info.mtime.timestamp() if info.mtime else 0.0

    def read_bytes(self) -> bytes:
        """The whole file; FileNotFoundError (naming the URI) where there is none."""
        if not self.remote:
            with open(self.uri, "rb") as f:
                return f.read()
        fs, key = self._fs()
        try:
            with fs.open_input_stream(key) as f:
                return f.read()
        except FileNotFoundError:
            raise FileNotFoundError(2, "no such object", self.uri) from None
        except OSError as e:
            if "not found" in str(e).lower() or "NoSuchKey" in str(e):
                raise FileNotFoundError(2, "no such object", self.uri) from None
            raise OSError(f"{self.uri}: reading failed ({str(e).splitlines()[0][:200]})") from None

    def read_from(self, start: int, size: Optional[int] = None) -> bytes:
        """Up to `size` bytes (None: to the end) from `start` (< 0: that many from the end, all of a smaller file;
        past the end: none): one ranged read, not the whole object."""
        if not self.remote:
            with open(self.uri, "rb") as f:
                total = f.seek(0, os.SEEK_END)
                f.seek(min(total, max(0, total + start if start < 0 else start)))
                return f.read(-1 if size is None else size)
        fs, key = self._fs()
        try:
            with fs.open_input_file(key) as f:
                total = f.size()
                begin = min(total, max(0, total + start if start < 0 else start))
                return f.read_at(total - begin if size is None else min(size, total - begin), begin)
        except FileNotFoundError:
            raise FileNotFoundError(2, "no such object", self.uri) from None
        except OSError as e:
            if "not found" in str(e).lower() or "NoSuchKey" in str(e):
                raise FileNotFoundError(2, "no such object", self.uri) from None
            raise OSError(f"{self.uri}: reading failed ({str(e).splitlines()[0][:200]})") from None

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def files(self) -> list[tuple["Location", int, float]]:
        """The files directly in this folder, as (location, size, mtime), by name; [] where there is no folder."""
        if not self.remote:
            try:
                entries = sorted(os.scandir(self.uri), key=lambda e: e.name)
            except (FileNotFoundError, NotADirectoryError):
                return []
            out = []
            for entry in entries:
                if entry.is_file():
                    st = entry.stat()
                    out.append((Location(entry.path), st.st_size, st.st_mtime))
            return out
        import pyarrow.fs as pafs

        infos = self._listing(recursive=False)
        return sorted(((self / i.base_name, int(i.size or 0), i.mtime.timestamp() if i.mtime else 0.0)
                       for i in infos if i.type == pafs.FileType.File), key=lambda t: t[0].name)

    def all_files(self) -> set[str]:
        """Every file under this folder, as paths relative to it (one listing, not one request per file)."""
        if not self.remote:
            out = set()
            for root, _, names in os.walk(self.uri):
                rel = os.path.relpath(root, self.uri)
                out.update(os.path.normpath(os.path.join(rel, n)) for n in names)
            return out
        import pyarrow.fs as pafs

        key = self._fs()[1]
        return {i.path[len(key) + 1:] for i in self._listing(recursive=True) if i.type == pafs.FileType.File}

    def _listing(self, recursive: bool) -> list:
        import pyarrow.fs as pafs

        fs, key = self._fs()
        try:
            return fs.get_file_info(pafs.FileSelector(key, recursive=recursive, allow_not_found=True))
        except Exception as e:
            raise OSError(f"{self.uri}: listing failed ({str(e).splitlines()[0][:200]})") from None

    def is_empty_folder(self) -> bool:
        """True where nothing is, or an empty folder (a run directory may be created there)."""
        if not self.remote:
            return not os.path.exists(self.uri) or (os.path.isdir(self.uri) and not os.listdir(self.uri))
        return not self.all_files()

    # ---- writing ------------------------------------------------------------------------------------------
    def write_bytes(self, data: bytes) -> None:
        """Whole or nothing: locally a temporary file renamed over this one; on object storage one upload of
        bytes made complete beforehand (an upload that fails part-way raises, and the store keeps the old
        object)."""
        if not self.remote:
            atomic_write(self.uri, lambda f: f.write(data))
            return
        fs, key = self._fs()
        try:
            with fs.open_output_stream(key) as f:
                f.write(data)
        except Exception as e:
            raise OSError(f"{self.uri}: writing failed ({str(e).splitlines()[0][:200]})") from None

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    def delete(self) -> None:
        """Remove this file (gone already: nothing to do)."""
        if not self.remote:
            try:
                os.unlink(self.uri)
            except FileNotFoundError:
                pass
            return
        fs, key = self._fs()
        try:
            fs.delete_file(key)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise OSError(f"{self.uri}: deleting failed ({str(e).splitlines()[0][:200]})") from None

    def mkdir(self, parents: bool = True, exist_ok: bool = True) -> None:
        """A local folder (as `Path.mkdir`, but with parents by default); object stores have no folders, so
        nothing there."""
        if not self.remote:
            Path(self.uri).mkdir(parents=parents, exist_ok=exist_ok)

    def cache(self) -> Path:
        """A local folder that stands for this location on this machine: the lock, logs and staged TensorBoard
        files of a run on object storage (`$LAD_CACHE_DIR`, default `~/.cache/lad/remote/<hash>`)."""
        root = os.environ.get("LAD_CACHE_DIR") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "lad")
        digest = hashlib.sha1(self.uri.encode()).hexdigest()[:16]
        path = Path(root) / "remote" / f"{self.name or 'root'}-{digest}"
        path.mkdir(parents=True, exist_ok=True)
        return path
