"""An image file's size read from its header, in the graph, without decoding it.

The `serving_bytes` signature of an export takes image files from whoever reaches the server; a
few hundred kilobytes of PNG can declare 20,000 x 20,000 pixels (1.2 GB once decoded to RGB).
`dimensions` reads height and width from the header of a JPEG (`tf.io.extract_jpeg_shape`, which
parses the markers up to the frame header), PNG (the IHDR chunk), GIF (the logical screen) or BMP
(the info header) with string ops only, so a request can be refused before anything is decoded.
The folder loader's Python-side checks of files on disk are `image_files`.
"""

import tensorflow as tf

FORMATS = "JPEG, PNG, GIF or BMP"
UNKNOWN = -1  # the size `dimensions` gives a file of another format, or a header cut short

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
# Bytes each header needs: PNG signature + IHDR up to the height; GIF's logical screen; BMP's
# file header + info header up to the height.
_PNG_HEADER, _GIF_HEADER, _BMP_HEADER = 24, 10, 26


def _unsigned(data, start, length, big_endian):
    """The unsigned integer in bytes [start, start + length) of the string `data`, as int64."""
    digits = tf.cast(tf.io.decode_raw(tf.strings.substr(data, start, length), tf.uint8),
                     tf.int64)
    if not big_endian:
        digits = tf.reverse(digits, [0])
    weights = tf.constant([256 ** (length - 1 - i) for i in range(length)], tf.int64)
    return tf.reduce_sum(digits * weights)


def _signed32_le(data, start):
    value = _unsigned(data, start, 4, big_endian=False)
    return tf.where(value >= 2 ** 31, value - 2 ** 32, value)


def _png(data):
    return tf.stack([_unsigned(data, 20, 4, True), _unsigned(data, 16, 4, True)])


def _gif(data):
    return tf.stack([_unsigned(data, 8, 2, False), _unsigned(data, 6, 2, False)])


def _bmp(data):
    def os2_core_header():  # 12 bytes, 16-bit sizes
        return tf.stack([_unsigned(data, 20, 2, False), _unsigned(data, 18, 2, False)])

    def info_header():  # 32-bit sizes; a negative height means rows stored top-down
        return tf.stack([tf.abs(_signed32_le(data, 22)), tf.abs(_signed32_le(data, 18))])

    return tf.cond(tf.equal(_unsigned(data, 14, 4, False), 12), os2_core_header, info_header)


def _jpeg(data):
    return tf.cast(tf.io.extract_jpeg_shape(data)[:2], tf.int64)


def dimensions(data):
    """[height, width] (int64) from the header of one encoded image (a string scalar).

    [UNKNOWN, UNKNOWN] for a file that is not a JPEG, PNG, GIF or BMP, or whose header is cut
    short. A JPEG whose markers before the frame header are damaged fails in
    `tf.io.extract_jpeg_shape` with its own InvalidArgument error.
    """
    length = tf.strings.length(data)
    # Zeros after the end, so every header read below is in range; `length` says what is real.
    header = tf.strings.substr(tf.strings.join([data, b"\0" * _BMP_HEADER]), 0, _BMP_HEADER)
    is_png = (tf.equal(tf.strings.substr(header, 0, 8), _PNG_MAGIC) & (length >= _PNG_HEADER)
              & tf.equal(tf.strings.substr(header, 12, 4), b"IHDR"))
    signature = tf.strings.substr(header, 0, 6)
    is_gif = ((tf.equal(signature, b"GIF87a") | tf.equal(signature, b"GIF89a"))
              & (length >= _GIF_HEADER))
    is_bmp = tf.equal(tf.strings.substr(header, 0, 2), b"BM") & (length >= _BMP_HEADER)
    is_jpeg = tf.equal(tf.strings.substr(header, 0, 3), _JPEG_MAGIC)
    unknown = tf.constant([UNKNOWN, UNKNOWN], tf.int64)
    return tf.case([(is_png, lambda: _png(header)), (is_gif, lambda: _gif(header)),
                    (is_bmp, lambda: _bmp(header)), (is_jpeg, lambda: _jpeg(data))],
                   default=lambda: unknown, exclusive=True)
