"""Strict tar reading: every member in one sequential pass, where damage is an error, never an
archive quietly cut short; and the hard and symbolic links between members."""

from __future__ import annotations

import posixpath
import tarfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

TAR_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error)


class NotATar(Exception):
    """The file does not open as a tar archive; the message is tarfile's reason, one line."""


class Damaged(Exception):
    """The archive opened but is damaged; the message is ``Type: reason``.

    Attributes:
        last: the name of the last member read before the damage, None before the first.
    """

    def __init__(self, error: BaseException, last: str | None):
        super().__init__(f"{type(error).__name__}: {error}")
        self.last = last


class StrictTarInfo(tarfile.TarInfo):
    """A header reader that raises where tarfile quietly ends the archive (a damaged, partial
    or missing header): only the all-zero end marker ends it, so no member is lost unseen.

    The class attributes word the damage ({offset}: where, {error}: tarfile's reason); a
    subclass passed to :func:`members` may word it otherwise.
    """

    BAD_HEADER = "bad header at byte {offset}: {error}"
    NO_END_MARKER = "the archive ends without its end marker"
    TRAILING_DATA = "data after the end-of-archive marker (a zeroed header?)"

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            raise
        except tarfile.HeaderError as e:
            if tar.offset == 0:  # not a tar at all: tarfile.open tries the next compression
                raise
            words = cls.NO_END_MARKER if isinstance(e, tarfile.EmptyHeaderError) else cls.BAD_HEADER
            raise tarfile.ReadError(words.format(offset=tar.offset,
                                                 error=e or type(e).__name__)) from None


def members(root: Path, wanted: Callable[[tarfile.TarInfo], bool],
            tarinfo: type[StrictTarInfo] = StrictTarInfo,
            ) -> Iterator[tuple[tarfile.TarInfo, str, bytes | None]]:
    """(member, its name, its bytes) of every member of the tar ``root``, in archive order,
    read in one sequential pass (random access into a .tar.gz restarts decompression).

    The name is normalised (``./a.png``, from ``tar -C dir .``, is ``a.png``, as tarfile
    finds links); the bytes are those of the regular files ``wanted``, else None.

    Raises:
        NotATar: the file does not open as a tar (plain, gzip, bzip2 or xz).
        Damaged: a bad header, truncated or corrupt compression, a gzip CRC that does not
            match, or data after the end marker: a partly read archive would lose members.
    """
    try:
        tar = tarfile.open(root, tarinfo=tarinfo)
    except TAR_ERRORS as e:
        raise NotATar(str(e).splitlines()[0].rstrip(":")) from None  # lists every method tried
    last = None
    try:
        with tar:
            while (m := tar.next()) is not None:
                tar.members.clear()  # tarfile keeps every header read: 0.5 GB per million
                raw = tar.extractfile(m).read() if m.isfile() and wanted(m) else None
                last = m.name
                yield m, posixpath.normpath(m.name), raw
            # Read to the end: a gzip stream checks its CRC and length only there, and only
            # zero padding may follow the end marker (else a zeroed header ended it early).
            while block := tar.fileobj.read(1 << 20):
                if block.count(0) != len(block):
                    raise tarfile.ReadError(tarinfo.TRAILING_DATA)
    except TAR_ERRORS as e:
        raise Damaged(e, last) from None


def link_target(m: tarfile.TarInfo) -> str:
    """The member name a link member leads to: a hard link names a member (it is the second
    name of a file archived once); a symbolic one is relative to its own folder."""
    base = "" if m.islnk() else posixpath.dirname(m.name)
    return posixpath.normpath(posixpath.join(base, m.linkname))


def follow(name: str, targets: dict[str, str]) -> str:
    """Where ``name`` leads through a chain of links (``targets``: link -> :func:`link_target`),
    as tarfile follows them; in a loop, it stops after one hop more than there are links."""
    for _ in range(len(targets) + 2):
        if name not in targets:
            break
        name = targets[name]
    return name
