"""Reading tar shards wherever they are: local files, ``pipe:`` commands, object stores, HTTP(S).

Local files are read as they are; a ``pipe:`` URL streams the standard output of its command, as
in WebDataset. Any other URL with a scheme (``http(s)://`` through the standard library;
``s3://``, ``gs://`` or what else an installed fsspec backend serves) is *downloaded* whole into an anonymous temporary file (it
vanishes when closed) before its samples are read: a reader's next shard(s) download in a
background thread while the current one is decoded, and a download that fails, at its start or
in the middle of the stream, is started again a bounded number of times with exponential backoff
before one `UserError` names the shard's URL. A shard is never half-read: a retry cannot deliver
a sample twice.

`iter_raw_samples` groups a tar's members into samples (WebDataset's convention) and checks that
the archive ends where a complete tar ends, so a cut shard fails loudly instead of losing its
tail in silence.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from pipeline.errors import UserError

log = logging.getLogger(__name__)

# The package that gives fsspec each protocol, for the error when it is missing.
FSSPEC_PACKAGES = {
    "s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
    "abfss": "adlfs", "hf": "huggingface_hub",
}
HTTP_SCHEMES = ("http", "https")
HTTP_TIMEOUT_S = 60.0  # a server silent this long counts as a failed attempt


def url_scheme(url: str) -> str | None:
    """``"s3"`` for ``s3://bucket/x.tar``; None for local paths and ``pipe:`` commands."""
    head, sep, _ = url.partition("://")
    if not sep or "/" in head or not head or url.startswith("pipe:"):
        return None
    return head.lower()


def is_remote(url: str) -> bool:
    """Whether `url` is read through fsspec (a scheme other than file://)."""
    return url_scheme(url) not in (None, "file")


def local_path(url: str) -> str:
    """The path of a local shard (``file://`` stripped)."""
    return url[len("file://"):] if url.startswith("file://") else url


def is_http(url: str) -> bool:
    return url_scheme(url) in HTTP_SCHEMES


def open_remote(url: str, key: str = "data.shards") -> BinaryIO:
    """A readable stream of a remote file; FileNotFoundError when the store says it is absent."""
    if is_http(url):
        import urllib.error
        import urllib.request

        try:
            return urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S)
        except urllib.error.HTTPError as exc:
            if exc.code in (404, 410):
                raise FileNotFoundError(url) from None
            raise
    fs, path = filesystem(url, key)
    return fs.open(path, "rb")


def filesystem(url: str, key: str = "data.shards"):
    """(fsspec filesystem, path inside it) for a remote URL; a missing package is a UserError."""
    scheme = url_scheme(url) or "file"
    try:
        import fsspec
    except ImportError:
        raise UserError(f"{key}: reading {url} needs fsspec: pip install fsspec "
                        f"{FSSPEC_PACKAGES.get(scheme, '')}".rstrip()) from None
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as exc:
        package = FSSPEC_PACKAGES.get(scheme)
        hint = f"pip install {package}" if package else str(exc).splitlines()[0]
        raise UserError(f"{key}: reading {scheme}:// URLs ({url}) needs fsspec's {scheme} "
                        f"backend: {hint}") from None
    except ValueError as exc:  # "Protocol not known"
        raise UserError(f"{key}: {url}: {exc}") from None


@dataclass(frozen=True)
class FetchPolicy:
    """How remote shards are fetched: downloads ahead, attempts, backoff between attempts."""

    prefetch: int = 1  # shards downloaded ahead of the one being read (at least 1)
    attempts: int = 5  # downloads of one shard before giving up
    backoff_s: float = 1.0  # wait before the second attempt; doubled each time, at most 30 s
    max_backoff_s: float = 30.0


class _Cancelled(Exception):
    pass


def download(url: str, policy: FetchPolicy, cancel: threading.Event | None = None) -> BinaryIO:
    """The whole shard at `url` in an anonymous temporary file, positioned at its start.

    Failures are retried up to ``policy.attempts`` downloads in all; a shard that does not exist
    fails at once. Either is a UserError naming the URL.
    """
    if not is_http(url):
        filesystem(url)  # a missing backend fails at once, untried
    last: BaseException | None = None
    for attempt in range(policy.attempts):
        if attempt:
            delay = min(policy.backoff_s * 2 ** (attempt - 1), policy.max_backoff_s)
            log.warning("shard %s: download failed (%s); attempt %d of %d in %.1f s",
                        url, _first_line(last), attempt + 1, policy.attempts, delay)
            if cancel is not None and cancel.wait(delay):
                raise _Cancelled()
            if cancel is None:
                time.sleep(delay)
        target = tempfile.TemporaryFile()
        try:
            with open_remote(url) as source:
                shutil.copyfileobj(source, target, 1 << 20)
                expected = _announced_length(source)
            if expected is not None and target.tell() != expected:
                raise OSError(f"connection closed after {target.tell()} of {expected} bytes")
            target.seek(0)
            return target
        except FileNotFoundError:
            target.close()
            raise UserError(f"shard {url} does not exist") from None
        except UserError:
            target.close()
            raise
        except Exception as exc:  # network and server errors of any backend: try again
            target.close()
            last = exc
    raise UserError(f"shard {url}: download failed {policy.attempts} times, last: "
                    f"{_first_line(last)}")


def _announced_length(source) -> int | None:
    """The byte count the server or store announced for a stream, where it did."""
    headers = getattr(source, "headers", None)
    if headers is not None:  # HTTP: Content-Length, unless the body is encoded (gzip)
        length = headers.get("Content-Length")
        if length is not None and length.isdigit() and not headers.get("Content-Encoding"):
            return int(length)
        return None
    size = getattr(source, "size", None)  # fsspec's file objects
    return size if isinstance(size, int) else None


def _first_line(exc: BaseException | None) -> str:
    text = str(exc).strip().splitlines() if exc is not None else []
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= 200 else line[:197] + "..."


def open_shard(url: str):
    """A readable binary stream of a local or ``pipe:`` shard."""
    if url.startswith("pipe:"):
        import webdataset

        return webdataset.gopen(url, "rb")
    return open(local_path(url), "rb", buffering=1 << 20)


def opened_shards(urls: list[str], policy: FetchPolicy) -> Iterator[tuple[str, BinaryIO | None]]:
    """(url, downloaded file or None) for each of `urls` in order, downloading remote ones ahead.

    None means "open it yourself" (local files and pipes). At most ``policy.prefetch`` remote
    shards wait downloaded beyond the one being read; closing the iterator stops the downloads
    and deletes what they left.
    """
    remote = [url for url in urls if is_remote(url)]
    if not remote:
        for url in urls:
            yield url, None
        return
    fetcher = _Prefetcher(remote, policy)
    try:
        for url in urls:
            yield url, (fetcher.take(url) if is_remote(url) else None)
    finally:
        fetcher.close()


class _Prefetcher:
    """One daemon thread downloading shards in order, `prefetch` ahead of the consumer."""

    def __init__(self, urls: list[str], policy: FetchPolicy):
        self.urls = urls
        self.policy = policy
        self.ready: queue.Queue = queue.Queue()
        # a slot per shard downloaded (or downloading) and not yet taken by the reader
        self.slots = threading.Semaphore(max(policy.prefetch, 1))
        self.cancel = threading.Event()
        self.thread = threading.Thread(target=self._run, name="shard-prefetch", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for url in self.urls:
            while not self.slots.acquire(timeout=0.5):
                if self.cancel.is_set():
                    return
            if self.cancel.is_set():
                return
            try:
                self.ready.put((url, download(url, self.policy, self.cancel), None))
            except _Cancelled:
                return
            except BaseException as exc:  # handed to the consumer, raised there
                self.ready.put((url, None, exc))
                return

    def take(self, url: str) -> BinaryIO:
        got, handle, error = self.ready.get()
        assert got == url, (got, url)
        if error is not None:
            raise error
        self.slots.release()
        return handle

    def close(self) -> None:
        self.cancel.set()
        while True:
            try:
                _, handle, _ = self.ready.get_nowait()
            except queue.Empty:
                break
            if handle is not None:
                handle.close()


# ---------------------------------------------------------------------------------------------
# Samples of one tar


class _CountingReader:
    """Passes reads through, counting bytes and keeping the last few KiB for the end check."""

    TAIL = 1 << 15

    def __init__(self, stream):
        self.stream = stream
        self.total = 0
        self.tail = b""

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.total += len(data)
        self.tail = (self.tail + data)[-self.TAIL :]
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass

    def close(self) -> None:
        self.stream.close()


def _check_archive_end(reader: _CountingReader, end_of_members: int) -> None:
    """A complete tar ends, right after its last member, in zero blocks (at least two).

    Python's tarfile in stream mode takes a header cut short, or a garbled one, after the first
    member for the end of the archive; without this check a damaged shard would lose its
    remaining samples silently.
    """
    reader.drain()
    trailer = reader.total - end_of_members
    if trailer < 1024 or trailer > len(reader.tail) or reader.total % 512:
        raise tarfile.ReadError(
            f"archive ends abnormally after byte {end_of_members} of {reader.total}"
        )
    if reader.tail[len(reader.tail) - trailer :].count(0) != trailer:
        raise tarfile.ReadError(f"unreadable data after byte {end_of_members}")


def sample_key(member_name: str) -> tuple[str, str] | None:
    """(key, extension) of a tar member: the name up to the first dot of its basename, and the
    rest in lower case; None for a name without a dot."""
    directory, _, base = member_name.rpartition("/")
    stem, dot, extension = base.partition(".")
    if not dot:
        return None
    return (f"{directory}/{stem}" if directory else stem), extension.lower()


def iter_raw_samples(url: str, fileobj: BinaryIO | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for each sample of a tar shard, in file order.

    Members are grouped by the part of their name before the first dot of the basename, the
    WebDataset convention. `fileobj`, when given, holds the shard's bytes (a downloaded remote
    shard) and is closed at the end. A damaged tar is a UserError naming the shard.
    """
    stream = _CountingReader(fileobj if fileobj is not None else _open_or_fail(url))
    current_key: str | None = None
    current: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                named = sample_key(member.name)
                if named is None:
                    continue
                key, extension = named
                if key != current_key:  # the sample before is complete: out before any damage
                    if current_key is not None:
                        yield current_key, current
                    current_key, current = key, {}
                handle = tar.extractfile(member)
                data = handle.read() if handle is not None else b""
                if len(data) != member.size:
                    raise tarfile.ReadError(f"member {member.name} is truncated")
                current[extension] = data
            end_of_members = tar.offset
        _check_archive_end(stream, end_of_members)
        if current_key is not None:
            yield current_key, current
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise UserError(
            f"shard {url} is damaged or unreadable ({exc}); check it with `data-prep verify`"
        ) from None
    finally:
        try:
            stream.close()
        except Exception as exc:  # a failing pipe: command reports its status on close
            raise UserError(f"shard {url}: {exc}") from None


def _open_or_fail(url: str):
    try:
        return open_shard(url)
    except OSError as exc:
        raise UserError(f"shard {url}: cannot open ({exc})") from None


def count_samples(url: str) -> int:
    """Samples in a local tar shard, from its member headers alone (no member data read)."""
    count, last = 0, None
    try:
        with tarfile.open(local_path(url), mode="r:") as tar:
            for member in tar:
                named = sample_key(member.name) if member.isfile() else None
                if named is not None and named[0] != last:
                    count, last = count + 1, named[0]
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise UserError(f"shard {url} is damaged or unreadable ({exc}); check it with "
                        "`data-prep verify`") from None
    return count


def file_size(path: str) -> int:
    return os.path.getsize(local_path(path))
