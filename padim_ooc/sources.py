"""Images that are not local files: objects at fsspec URLs, and members of ``.tar`` shards.

:func:`padim_ooc.data.list_images` hands two kinds of source here:

- a URL (``s3://bucket/prefix/``, ``gs://...``, any fsspec protocol): a prefix is
  listed recursively with one paged listing (``fs.find(detail=True)``: S3's
  ``ListObjectsV2`` gives 1,000 keys a request, with their size and ETag), not a
  request per key; a URL ending in ``.txt``/``.lst``/``.list`` is a list whose lines
  may be URLs or paths relative to it; one ending in ``.tar`` is a shard;
- a ``.tar`` shard (the WebDataset layout: a plain, uncompressed tar), local or at a
  URL: its members with an image suffix are images, listed from the tar headers
  and read in order through one open stream per shard (a read-ahead buffer for a
  URL), so a shard is read front to back once, not a request per member.

The images come back as strings: a :class:`Remote` (a URL, with the size and ETag
its listing gave) or a :class:`TarMember` (``tar://<member>::<shard>``, fsspec's own
chained-URL spelling), beside the :class:`pathlib.Path` of a local file.
:func:`read_many` reads a batch of them concurrently (``fs.cat`` of many URLs: one
round trip for all of them, on the filesystem's event loop).

:func:`identity` is what recognises an image without reading it (the fit's cache of
identities, :meth:`padim_ooc.store.ModelStore.identities`): path, size, modification
time and inode of a local file; URL, size and ETag of an object; shard identity,
member name, offset and size of a tar member. A file that changes gets another
identity, and is read and hashed again.
"""
from __future__ import annotations

import hashlib
import os
import tarfile
import threading
from pathlib import Path, PurePosixPath

from .errors import PadimError

TAR_SUFFIX = ".tar"
IDENTITY_SIZE = 16
# read-ahead of a tar shard at a URL, and the most shards held open at once per process
TAR_BLOCK = 16 * 2**20
OPEN_SHARDS = 4
# objects requested at once by read_many
CONCURRENT = 64


def is_url(text) -> bool:
    return isinstance(text, str) and "://" in text


class Remote(str):
    """A URL of one image, with what the listing said of it (``size``, ``tag``: the ETag)."""

    size: int | None = None
    tag: str | None = None

    @classmethod
    def of(cls, url: str, size: int | None = None, tag: str | None = None) -> "Remote":
        item = cls(url)
        item.size, item.tag = size, tag
        return item


class TarMember(str):
    """One member of a tar shard, spelled ``tar://<name>::<shard>``.

    ``shard`` is the shard's path or URL, ``offset`` and ``size`` where the member's
    bytes are in it; ``tag`` identifies the shard's version (size and mtime, or ETag).
    """

    shard: str = ""
    name: str = ""
    offset: int = 0
    size: int = 0
    tag: str | None = None

    @classmethod
    def of(cls, shard: str, name: str, offset: int, size: int, tag: str | None) -> "TarMember":
        item = cls(f"tar://{name}::{shard}")
        item.shard, item.name, item.offset, item.size, item.tag = shard, name, offset, size, tag
        return item


def claims(src) -> bool:
    """Whether ``src`` is a source this module lists (a URL, or a local ``.tar`` file)."""
    if is_url(src):
        return True
    path = Path(os.fsdecode(src))
    return path.suffix.lower() == TAR_SUFFIX and path.is_file()


def filesystem(url: str):
    """(fsspec filesystem, path inside it) of ``url``; a one-line error for an unknown protocol."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as err:
        raise PadimError(f"cannot read {url}: {err}") from None


def _fail(url: str, err: Exception) -> PadimError:
    if isinstance(err, FileNotFoundError):
        return PadimError(f"input not found: {url} (no such bucket, prefix or object)")
    if isinstance(err, PermissionError):
        return PadimError(f"access denied to {url}: {err}")
    return PadimError(f"cannot list {url}: {type(err).__name__}: {err}")


def expand(src, image_suffixes, list_suffixes) -> list:
    """The images of one source this module :func:`claims`, in order (see the module docs).

    Raises
    ------
    PadimError
        If the bucket, prefix or object does not exist, access is denied, or no image is found.
    """
    if not is_url(src):
        return tar_members(os.path.abspath(os.fsdecode(src)))
    url = src
    suffix = PurePosixPath(url.split("::")[0]).suffix.lower()
    if suffix == TAR_SUFFIX:
        return tar_members(url)
    fs, path = filesystem(url)
    if suffix in list_suffixes:
        try:
            text = fs.cat_file(path).decode("utf-8", "surrogateescape")
        except Exception as err:
            raise _fail(url, err) from None
        return _list_lines(url, text)
    try:
        fs.invalidate_cache(path)
        found = fs.find(path, detail=True, withdirs=False)
    except Exception as err:
        raise _fail(url, err) from None
    if not found:
        raise PadimError(f"input not found: {url} (no such bucket, prefix or object)")
    out = []
    for key in sorted(found):
        info = found[key]
        full = key if "://" in key else fs.unstrip_protocol(key)
        ext = PurePosixPath(key).suffix.lower()
        if ext in image_suffixes:
            out.append(Remote.of(full, info.get("size"), _tag(info)))
        elif ext == TAR_SUFFIX:
            out.extend(tar_members(full))
    if not out:
        raise PadimError(f"no images found in {url} (looked for {', '.join(sorted(image_suffixes))} "
                         f"and {TAR_SUFFIX} shards)")
    return out


def _tag(info: dict) -> str | None:
    """What says an object's version in a listing: its ETag (S3, GCS, Azure), else its mtime."""
    for key in ("ETag", "etag", "md5Hash", "generation", "mtime", "LastModified", "created"):
        if info.get(key) is not None:
            return f"{key}={info[key]}"
    return None


def _list_lines(url: str, text: str) -> list:
    base = url.rsplit("/", 1)[0]
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        target = line if is_url(line) or line.startswith("/") else f"{base}/{line}"
        out.extend(list_line(target))
    if not out:
        raise PadimError(f"the list {url} names no images")
    return out


def list_line(line: str) -> list:
    """One line of a list file that is a URL (or any line of a list at a URL): a ``.tar``
    shard gives its members, anything else is taken as one image (read later)."""
    if PurePosixPath(line).suffix.lower() == TAR_SUFFIX:
        return tar_members(line)
    return [Remote(line) if is_url(line) else Path(line)]


# ---- tar shards ---------------------------------------------------------------------------
def _open_shard(shard: str, block: int = TAR_BLOCK):
    if is_url(shard):
        fs, path = filesystem(shard)
        return fs.open(path, "rb", block_size=block, cache_type="readahead")
    return open(shard, "rb")


def _shard_tag(shard: str) -> str | None:
    try:
        if is_url(shard):
            fs, path = filesystem(shard)
            info = fs.info(path)
            return f"{info.get('size')}:{_tag(info)}"
        st = os.stat(shard)
        return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"
    except Exception:
        return None


def tar_members(shard: str) -> list[TarMember]:
    """The members of the tar ``shard`` with an image suffix, in the order they are stored.

    A shard that is damaged part way gives the members before the damage and one
    member that cannot be read (a counted skip when fitted), named after the shard.

    Raises
    ------
    PadimError
        If the shard cannot be opened or is not a tar file.
    """
    from .data import IMAGE_SUFFIXES

    tag = _shard_tag(shard)
    out: list[TarMember] = []
    try:
        f = _open_shard(shard, block=2**20)
    except Exception as err:
        raise _fail(shard, err) from None
    with f:
        try:
            tar = tarfile.open(fileobj=f, mode="r:")
        except (tarfile.TarError, OSError) as err:
            raise PadimError(f"{shard} is not a readable tar shard: {err}") from None
        end, total = 0, None
        try:
            for m in tar:
                end = m.offset_data + m.size
                if m.isfile() and PurePosixPath(m.name).suffix.lower() in IMAGE_SUFFIXES:
                    out.append(TarMember.of(shard, m.name, m.offset_data, m.size, tag))
            total = _size(f)
        except (tarfile.TarError, OSError, EOFError) as err:
            total = _size(f)
            if total is None or end <= total:  # (a member cut short is its own counted skip)
                out.append(TarMember.of(shard, f"(damaged after byte {end}: {err})", end, -1, None))
            total = None
        if total is not None and total - end > 2 * tarfile.RECORDSIZE:  # listing stopped at a bad header
            out.append(TarMember.of(shard, f"(damaged after byte {end}: invalid tar header)", end, -1, None))
    return out


def _size(f) -> int | None:
    try:
        return f.seek(0, os.SEEK_END)
    except Exception:
        return None


class _Shards(threading.local):
    """Open shards of this thread (at most OPEN_SHARDS), each read forwards as a stream."""

    def __init__(self):
        self.open: dict[str, object] = {}

    def read(self, member: TarMember) -> bytes:
        f = self.open.pop(member.shard, None)
        if f is None:
            if len(self.open) >= OPEN_SHARDS:
                self.open.pop(next(iter(self.open))).close()
            f = _open_shard(member.shard)
        self.open[member.shard] = f  # most recently used last
        f.seek(member.offset)
        return f.read(member.size)


_shards = _Shards()


# ---- reading ----------------------------------------------------------------------------
def read_bytes(item: str) -> tuple[bytes | None, str | None]:
    """The bytes of a URL or tar member, or (None, reason)."""
    return read_many([item])[0]


def read_many(items) -> list[tuple[bytes | None, str | None]]:
    """The bytes of each item (URLs, tar members), or (None, reason) for each that cannot
    be read; URLs of one filesystem in one concurrent ``fs.cat``."""
    out: list = [None] * len(items)
    urls: dict[str, list[int]] = {}
    for k, item in enumerate(items):
        if isinstance(item, TarMember):
            out[k] = _read_member(item)
        else:
            urls.setdefault(str(item).split("://", 1)[0], []).append(k)
    for ks in urls.values():
        fs, _ = filesystem(str(items[ks[0]]))
        paths = [filesystem(str(items[k]))[1] for k in ks]
        for k, data in zip(ks, _cat_all(fs, paths)):
            out[k] = _result(data)
    return out


def _cat_all(fs, paths: list[str]) -> list:
    """Each path's bytes or the exception reading it raised; concurrently on an async
    filesystem (s3fs, gcsfs, adlfs), CONCURRENT requests at a time."""
    if not getattr(fs, "async_impl", False):
        got = []
        for p in paths:
            try:
                got.append(fs.cat_file(p))
            except Exception as err:
                got.append(err)
        return got
    import asyncio

    from fsspec.asyn import sync

    async def gather():
        out = []
        for i in range(0, len(paths), CONCURRENT):
            out += await asyncio.gather(*(fs._cat_file(p) for p in paths[i:i + CONCURRENT]),
                                        return_exceptions=True)
        return out

    return sync(fs.loop, gather)


def _result(data) -> tuple[bytes | None, str | None]:
    if isinstance(data, (bytes, bytearray)):
        return bytes(data), None
    if isinstance(data, FileNotFoundError) or data is None:
        return None, "object not found (removed after it was listed?)"
    if isinstance(data, PermissionError):
        return None, f"access denied: {data}"
    if isinstance(data, IsADirectoryError):
        return None, "a folder, not an image file"
    return None, f"cannot read: {type(data).__name__}: {data}"


def _read_member(member: TarMember) -> tuple[bytes | None, str | None]:
    if member.size < 0:
        return None, f"damaged tar shard {member.shard}: {member.name.strip('()')}"
    try:
        data = _shards.read(member)
    except Exception as err:
        _shards.open.pop(member.shard, None)
        return None, f"cannot read tar shard {member.shard}: {type(err).__name__}: {err}"
    if len(data) < member.size:
        return None, f"truncated tar shard: {len(data)} of {member.size} bytes"
    return data, None


# ---- identities -------------------------------------------------------------------------
def identity(item) -> bytes | None:
    """A 16-byte identity of an image that changes whenever its content may have: see the
    module docs. None where nothing cheap identifies it (a URL from a list, an unreadable file)."""
    if isinstance(item, TarMember):
        if item.tag is None or item.size < 0:
            return None
        text = f"tar\0{item.shard}\0{item.tag}\0{item.name}\0{item.offset}\0{item.size}"
    elif isinstance(item, Remote) or is_url(item):
        tag = getattr(item, "tag", None)
        if tag is None:
            return None
        text = f"url\0{item}\0{getattr(item, 'size', None)}\0{tag}"
    else:
        try:
            st = os.stat(item)
        except OSError:
            return None
        text = f"file\0{os.path.abspath(os.fsdecode(item))}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}"
    return hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=IDENTITY_SIZE).digest()


def as_item(p):
    """A path or item sent to another process, as the kind it was (a local path as a Path)."""
    return p if is_url(p) else Path(p)


__all__ = ["Remote", "TarMember", "claims", "expand", "read_bytes", "read_many", "identity", "tar_members",
           "is_url", "as_item", "list_line"]
