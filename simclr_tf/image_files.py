"""Cheap checks, made once when a folder is listed, that an image file can be decoded.

Policy for `folder:` datasets (see `data`): a file is skipped when its content is not JPEG, PNG,
GIF or BMP (whatever its extension), when it ends before its format's end marker (truncated), when
a JPEG's Huffman tables are ones the decoder refuses ("Bogus Huffman table definition"), or when
its header announces more than `MAX_PIXELS` pixels (decoding it would take gigabytes). A JPEG
damaged inside its image data is kept: TensorFlow's decoder recovers from that (libjpeg warns on
stderr) and trains on what decodes, as an export's `serving_bytes` embeds it. Each
listing logs ONE warning that counts the skipped files and names the first `NAMED_IN_WARNING` with
the reason; `DatasetInfo.num_examples` counts only the files kept. Grayscale, RGBA, paletted and
16-bit images are fine (the decoder turns them into 8-bit RGB).

Cost: the first bytes and the last KiB of every file (two small reads), from a thread pool; a
JPEG or PNG whose end marker is not in its last KiB (a motion photo with a video appended, a PNG
with trailing data) is read to the end once to find it. Corruption in the middle of a file that
passes these checks is still caught by the pipeline (`Dataset.ignore_errors`, with TensorFlow's
own warning), but is not named or counted here.
"""

import concurrent.futures
import functools
import os
import struct

import tensorflow as tf
from absl import logging

from simclr_tf.errors import first_line

# PIL refuses more than 2 x 89.5 megapixels as a "decompression bomb"; 100 MP = 300 MB of RGB.
MAX_PIXELS = 100_000_000
NAMED_IN_WARNING = 10
_TAIL = 1024
_PARALLEL_FROM = 64        # files; fewer are checked in the calling thread
_THREADS = 16              # I/O bound: reads, not decoding
_BLOCK = 512               # files per thread-pool task (a million futures would cost memory)

_PNG = b"\x89PNG\r\n\x1a\n"
_JPEG = b"\xff\xd8\xff"
_GIFS = (b"GIF87a", b"GIF89a")
_BMP = b"BM"
# JPEG start-of-frame markers (they carry the size); C4, C8 and CC are other markers.
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_JPEG_SOS, _JPEG_DHT, _JPEG_EOI = 0xDA, 0xC4, b"\xff\xd9"
_NOT_AN_IMAGE = "not a JPEG, PNG, GIF or BMP file"


def keep_decodable(root, paths, labels):
    """Drops the files that cannot be decoded, warning once (per process) which and why.

    Args:
      root: the folder, for the warning and relative names.
      paths, labels: parallel sequences of the listed files and their label ids.

    Returns:
      (paths kept, their labels, number of files skipped), as tuples and an int.
    """
    problems = _problems(str(root), tuple(paths))
    keep = [i for i, problem in enumerate(problems) if problem is None]
    return (tuple(paths[i] for i in keep), tuple(labels[i] for i in keep),
            len(paths) - len(keep))


def problem(path):
    """Why the file at `path` cannot be decoded (one short phrase), or None if it looks fine."""
    try:
        with _open(path) as f:
            return _inspect(f)
    except (OSError, tf.errors.OpError) as e:
        return f"unreadable ({getattr(e, 'strerror', None) or first_line(e)})"


@functools.lru_cache(maxsize=8)
def _problems(root, paths):
    """Cached, so the several listings of one run check (and warn) once."""
    if len(paths) < _PARALLEL_FROM:
        found = [problem(path) for path in paths]
    else:
        blocks = [paths[i:i + _BLOCK] for i in range(0, len(paths), _BLOCK)]
        with concurrent.futures.ThreadPoolExecutor(_THREADS) as pool:
            found = [p for block in pool.map(lambda b: [problem(x) for x in b], blocks)
                     for p in block]
    skipped = [(path, why) for path, why in zip(paths, found) if why is not None]
    if skipped:
        named = ", ".join(f"{_relative(path, root)} ({why})"
                          for path, why in skipped[:NAMED_IN_WARNING])
        more = (f" and {len(skipped) - NAMED_IN_WARNING} more"
                if len(skipped) > NAMED_IN_WARNING else "")
        logging.warning("image folder %s: skipping %d of %d files that cannot be decoded: %s%s",
                        root, len(skipped), len(paths), named, more)
    return tuple(found)


def _inspect(f):
    head = f.read(64)
    if not head:
        return "empty file"
    f.seek(0, os.SEEK_END)
    size = f.tell()
    if head.startswith(_PNG):
        return _check_png(f, head, size)
    if head.startswith(_JPEG):
        return _check_jpeg(f, size)
    if head[:6] in _GIFS:
        return _check_gif(f, head, size)
    if head.startswith(_BMP):
        return _check_bmp(head, size)
    return _NOT_AN_IMAGE


def _check_png(f, head, size):
    if len(head) < 24 or head[12:16] != b"IHDR":
        return "truncated PNG (no header chunk)"
    width, height = struct.unpack(">II", head[16:24])
    return _check_size(width, height) or _check_end(f, size, b"IEND", 33, "PNG (no IEND chunk)")


def _check_jpeg(f, size):
    """Walks the marker segments to the frame header (the size), then looks for the EOI marker."""
    offset, dims = 2, None
    for _ in range(256):
        f.seek(offset)
        marker = f.read(4)
        if len(marker) < 4 or marker[0] != 0xFF:
            return "truncated or corrupt JPEG (bad marker segments)"
        code = marker[1]
        if code == 0xFF:          # fill byte before a marker
            offset += 1
            continue
        length = struct.unpack(">H", marker[2:4])[0]
        if length < 2:  # a segment's length counts its own two bytes
            return "truncated or corrupt JPEG (bad marker segments)"
        if code in _JPEG_SOF:
            frame = f.read(5)
            if len(frame) < 5:
                return "truncated JPEG (in the frame header)"
            dims = struct.unpack(">HH", frame[1:5])[::-1]
        if code == _JPEG_DHT and not _valid_huffman_tables(f.read(length - 2), length - 2):
            return "corrupt JPEG (bad Huffman table)"
        if code == _JPEG_SOS:
            break
        offset += 2 + length
    else:
        return "corrupt JPEG (no image data after 256 segments)"
    if dims is None:
        return "corrupt JPEG (no frame header before the image data)"
    # Entropy-coded data cannot contain FF D9 (a data byte FF is stuffed as FF 00), so an EOI
    # after the scan start means the image data is complete.
    return _check_size(*dims) or _check_end(f, size, _JPEG_EOI, offset, "JPEG (no end marker)")


def _valid_huffman_tables(segment, length):
    """Whether a DHT segment's tables pass the checks of libjpeg's get_dht and
    jpeg_make_d_derived_tbl (a table that fails them stops the decoder)."""
    if len(segment) < length:
        return False
    while segment:
        if len(segment) < 17 or segment[0] >> 4 > 1 or segment[0] & 15 > 3:
            return False
        counts = segment[1:17]
        total = sum(counts)
        if total > 256 or len(segment) < 17 + total:
            return False
        if segment[0] >> 4 == 0 and any(symbol > 15 for symbol in segment[17:17 + total]):
            return False  # a DC table's symbols are bit counts of at most 15
        used = [size for size, count in enumerate(counts, 1) if count]
        code = 0
        for size in range(used[0], used[-1] + 1) if used else ():
            code += counts[size - 1]
            if code >= 1 << size:  # the codes of this length overflow it (or one is all ones)
                return False
            code <<= 1
        segment = segment[17 + total:]
    return True


def _check_gif(f, head, size):
    width, height = struct.unpack("<HH", head[6:10])
    too_big = _check_size(width, height)
    if too_big:
        return too_big
    f.seek(max(size - 16, 0))
    if not f.read().rstrip(b"\0").endswith(b";"):
        return "truncated GIF (no trailer)"
    return None


def _check_bmp(head, size):
    if len(head) < 26:
        return "truncated BMP (header)"
    declared, _, offset, header_size = struct.unpack("<IIII", head[2:18])
    if header_size == 12:         # OS/2 BITMAPCOREHEADER
        width, height = struct.unpack("<HH", head[18:22])
    else:
        width, height = struct.unpack("<ii", head[18:26])
    if declared > size or offset > size:
        return f"truncated BMP ({size} of {max(declared, offset)} bytes)"
    return _check_size(abs(width), abs(height))


def _check_size(width, height):
    if width == 0 or height == 0:
        return f"announces a {width}x{height} image"
    if width * height > MAX_PIXELS:
        return f"{width}x{height} pixels, more than the {MAX_PIXELS} allowed"
    return None


def _check_end(f, size, marker, after, what):
    """None if `marker` occurs after byte `after`: in the last KiB first, else anywhere."""
    start = max(size - _TAIL, after)
    f.seek(start)
    if marker in f.read():
        return None
    if start > after:             # rare: data appended after the image; read it all once
        f.seek(after)
        if marker in f.read():
            return None
    return f"truncated {what}"


def _open(path):
    if "://" in path:
        return tf.io.gfile.GFile(path, "rb")
    return open(path, "rb")


def _relative(path, root):
    prefix = root.rstrip("/") + "/"
    return path[len(prefix):] if path.startswith(prefix) else path
