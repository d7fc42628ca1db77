"""DICOM reader (pydicom): gate on the header, then decode the first frame for display.

Every header is untrusted. The header is read first (large elements such as Pixel
Data are deferred) and the file is refused, before any pixel is decoded, when it has
no pixels, is not a chest radiograph (Modality other than CR/DX/DR; a missing
Modality is accepted), names another body part (``not-chest``, see
:mod:`pneumobatch.io.readers.bodyparts`), is a lateral view, is larger than ``max_pixels`` or uses a
transfer syntax no installed plugin decodes. Nothing but
:class:`~pneumobatch.core.errors.FileRejected` leaves :func:`read_dicom`. Header
values are read through :mod:`.dicom_values`; stored values become display values in
:mod:`.dicom_pixels`.

Pixel policy:

* Only the first frame is decoded; ``meta["frames"]`` is *Number of Frames*.
* With ``ReadOptions.min_side`` set, a monochrome JPEG 2000 or 8-bit JPEG frame is
  decoded at a reduced scale (:mod:`pneumobatch.io.readers.reduced`) when the codec allows
  it; pydicom decodes everything else, and those frames whenever the reduced decode
  does not apply or fails. Both yield stored values that go through the same steps below.
* Modality LUT: *Modality LUT Sequence* or *Rescale Slope/Intercept*.
* VOI: the first *VOI LUT Sequence* item, else the first *Window Center/Width*
  (LINEAR, LINEAR_EXACT or SIGMOID, by pydicom's ``apply_windowing``), else min-max
  of the image. A window with an unusable width and a LUT with a constant output are
  ignored. A VOI LUT's output is scaled by the range of its own entries, not by its
  nominal bit depth, since many LUTs declare 16 bits and hold 12.
* MONOCHROME1 is inverted so that 1 is always white on display; *Presentation LUT
  Shape* is not applied (for DX it restates the photometric interpretation).
* Colour (RGB, YBR_*, PALETTE COLOR) is converted to luminance (ITU-R 601-2, as for
  PNG/JPEG) and min-max scaled; other photometric interpretations are refused as
  ``unsupported-pixels``.
* Without Pixel Data a file is ``no-pixels`` (SR, KOS, presentation state,
  DICOMDIR...), except that an image header (Rows/Columns) without pixels, an empty
  data set, one naming no SOP Class, or one holding standard (even-group) tags that
  no dictionary knows is ``corrupt``: that is what a truncated or garbled file looks
  like after pydicom's lenient parse.
* Native (uncompressed) Pixel Data longer than twice what Rows x Columns x Samples x
  Bits Allocated x Number of Frames declare (plus 1 MiB) is ``corrupt``, refused from
  its length before the value is read: pydicom reads the whole element.
* The file is opened once (:func:`~pneumobatch.io.discovery.open_input`: never a FIFO
  or device put in its place after discovery) and every byte, deferred Pixel Data
  included, is read through that descriptor.
* Details quote no header values: quoted text in decoder messages is elided, so a
  misparsed name can never reach the CSV.
"""

from __future__ import annotations

import logging
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Optional

import numpy as np
import pydicom
from pydicom import uid
from pydicom.datadict import dictionary_has_tag
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragments, get_frame
from pydicom.pixels import get_decoder
from pydicom.pixels import pixel_array as decode_pixels

from pneumobatch.core.errors import FileRejected, Reason
from pneumobatch.core.logs import reapply
from pneumobatch.core.subgroups import age_band, age_years
from pneumobatch.core.uids import valid_uid
from pneumobatch.io.discovery import open_input
from pneumobatch.io.readers import reduced
from pneumobatch.io.readers.base import Image, ReadOptions, decode_side
from pneumobatch.io.readers.bodyparts import DESCRIPTION_KEYWORDS, examined_part
from pneumobatch.io.readers.dicom_pixels import display_table, to_display
from pneumobatch.io.readers.dicom_values import (
    as_int,
    as_text,
    frame_count,
    has_data,
    header_value,
    short_error,
)

reapply("pydicom")  # its import set its logger to WARNING: back to the level setup_logging chose

logger = logging.getLogger(__name__)

#: Modalities of projection radiographs; "DR" is not a DICOM term but is common.
CXR_MODALITIES = frozenset({"CR", "DX", "DR"})
#: ViewPosition values of lateral views, decubitus included (not a standard PA/AP).
LATERAL_VIEWS = frozenset({"LL", "RL", "LAT", "LATERAL", "LLD", "RLD", "LLAT", "RLAT", "LEFT LATERAL", "RIGHT LATERAL"})
_BODY_PART_KEYWORDS = ("BodyPartExamined", *DESCRIPTION_KEYWORDS)
#: Modality defined terms (PS3.3 C.7.3.1.1.1); only these are ever named in a detail.
DICOM_MODALITIES = frozenset(
    "AR ASMT AU BDUS BI BMD CT CTPROTOCOL DG DOC DX ECG EPS ES FID GM HC HD IO IOL IVOCT IVUS KER KO LEN LS MG MR "
    "M3D NM OAM OCT OP OPM OPT OPTBSV OPTENF OPV OSS OT PLAN PR PT PX REG RESP RF RG RTDOSE RTIMAGE RTPLAN "
    "RTRECORD RTSTRUCT RWV SEG SM SMR SR SRF STAIN TEXTUREMAP TG US VA XA XC".split()
)
_KNOWN_PHOTOMETRIC = frozenset(
    "MONOCHROME1 MONOCHROME2 RGB HSV ARGB CMYK YBR_FULL YBR_FULL_422 YBR_PARTIAL_422 YBR_PARTIAL_420 "
    "YBR_ICT YBR_RCT XYB".split()
) | {"PALETTE COLOR"}
#: Decoded bytes allowed per pixel of ``--max-pixels``: a 16-bit greyscale image at the
#: pixel limit passes; an RGB or 32-bit image must be correspondingly smaller.
MAX_BYTES_PER_PIXEL = 2


@dataclass(frozen=True)
class Codec:
    """How to decode one compressed transfer syntax: pydicom plugins, fastest first."""

    plugins: tuple[str, ...]
    install: str  # what to ``pip install`` when none of them is available


_JPEG_LOSSLESS = Codec(("gdcm", "pylibjpeg"), "pylibjpeg pylibjpeg-libjpeg")
_JPEG_LS = Codec(("pyjpegls", "gdcm", "pylibjpeg"), "pyjpegls")
_J2K = Codec(("pylibjpeg", "gdcm", "pillow"), "pylibjpeg pylibjpeg-openjpeg")
_HTJ2K = Codec(("pylibjpeg",), "pylibjpeg pylibjpeg-openjpeg")

#: Decoder preference per transfer syntax, from shared/PERFORMANCE_NOTES.md (one core,
#: 2048x2048 12-bit). Plugins not listed but available are tried after these.
CODECS: dict[str, Codec] = {
    uid.RLELossless: Codec(("pylibjpeg", "pydicom"), "pylibjpeg pylibjpeg-rle"),  # ~51 vs ~8/s
    uid.JPEGBaseline8Bit: Codec(("pillow", "pylibjpeg", "gdcm"), "pillow"),  # ~130 vs ~28/s
    # usually 12-bit, which Pillow cannot decode (it would fail first, noisily)
    uid.JPEGExtended12Bit: Codec(("pylibjpeg", "gdcm", "pillow"), "pylibjpeg pylibjpeg-libjpeg"),
    uid.JPEGLossless: _JPEG_LOSSLESS,  # gdcm ~9/s, pylibjpeg-libjpeg ~6.5/s
    uid.JPEGLosslessSV1: _JPEG_LOSSLESS,
    uid.JPEGLSLossless: _JPEG_LS,  # ~13 / ~8 / ~3.5
    uid.JPEGLSNearLossless: _JPEG_LS,
    uid.JPEG2000Lossless: _J2K,  # ~2.6 / ~2.2
    uid.JPEG2000: _J2K,
    uid.HTJ2KLossless: _HTJ2K,
    uid.HTJ2KLosslessRPCL: _HTJ2K,
    uid.HTJ2K: _HTJ2K,
}

_JPEG_FAMILY = frozenset(
    {
        uid.JPEGBaseline8Bit,
        uid.JPEGExtended12Bit,
        uid.JPEGLossless,
        uid.JPEGLosslessSV1,
        uid.JPEGLSLossless,
        uid.JPEGLSNearLossless,
    }
)
_J2K_FAMILY = frozenset({uid.JPEG2000Lossless, uid.JPEG2000, uid.HTJ2KLossless, uid.HTJ2KLosslessRPCL, uid.HTJ2K})
_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_COLOUR = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420"})
_MONOCHROME = frozenset({"MONOCHROME1", "MONOCHROME2"})
_DEFER_SIZE = 64 * 1024  # bytes: larger elements are read only if needed
#: Deflated data sets are inflated whole by pydicom: refuse more than this many
#: bytes per allowed pixel (plus slack for the header) before it tries.
_DEFLATE_BYTES_PER_PIXEL = 8
_DEFLATE_SLACK = 16 * 1024 * 1024
_DEFLATED_UID = uid.DeflatedExplicitVRLittleEndian.encode("ascii")
_LONG_LENGTH_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
#: Native Pixel Data may exceed what the header declares (padding, a stray extra frame) by
#: this factor plus :data:`_PIXEL_SLACK`; beyond, it is refused before it is read.
_PIXEL_EXCESS_FACTOR = 2
_PIXEL_SLACK = 1 << 20
_UNDEFINED_LENGTH = 0xFFFFFFFF


def read_dicom(path: Path, options: ReadOptions) -> Image:
    """Read a DICOM file as a float32 image in [0, 1] (1 = white) plus sanitised metadata.

    A rejection after the header was read carries that metadata in ``FileRejected.meta``,
    so skipped files still name their study.
    """
    meta: dict[str, Any] = {}
    with warnings.catch_warnings():
        # pydicom warns about every odd header (and logs the same text to its logger);
        # for a nightly batch the outcome is the reason code, not stderr noise.
        warnings.simplefilter("ignore", UserWarning)
        try:
            return _read(path, options, meta)
        except FileRejected as exc:
            rejection, cause = exc, exc.__cause__
        except MemoryError as exc:
            rejection, cause = FileRejected(Reason.TOO_LARGE, "out of memory"), exc
        except Exception as exc:  # pydicom converts elements lazily: any access may raise
            rejection, cause = FileRejected(Reason.CORRUPT, f"malformed DICOM: {short_error(exc)}"), exc
    rejection.meta = {**meta, **(getattr(rejection, "meta", None) or {})}
    raise rejection from cause


def read_header(path: Path, options: Optional[ReadOptions] = None) -> Dataset:
    """The header of a DICOM file, no pixel decoded: opened as :func:`read_dicom` opens it
    (never a FIFO or device) and parsed as it parses it (a deflated data set inflated with its
    limit), large values deferred. The file is closed on return, so deferred values (Pixel
    Data) are no longer readable; small header values are. Raises only
    :class:`~pneumobatch.core.errors.FileRejected`."""
    options = options or ReadOptions()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        try:
            fh = open_input(path)
        except OSError as exc:
            raise FileRejected(Reason.UNREADABLE, short_error(exc)) from exc
        with fh:
            return _read_header(path, fh, options)


def _read(path: Path, options: ReadOptions, meta: dict[str, Any]) -> Image:
    try:
        fh = open_input(path)
    except OSError as exc:
        raise FileRejected(Reason.UNREADABLE, short_error(exc)) from exc
    with fh:  # open until the pixels are decoded: deferred values are read through it
        return _read_open(path, fh, options, meta)


def _read_open(path: Path, fh: BinaryIO, options: ReadOptions, meta: dict[str, Any]) -> Image:
    ds = _read_header(path, fh, options)
    tsyntax = _transfer_syntax(ds)
    meta.update(_metadata(ds, tsyntax))
    _gate(ds, meta, options)
    plugins = _decoding_plugins(tsyntax)  # also refuses an invalid Transfer Syntax UID
    _check_pixel_length(ds, tsyntax)
    _check_codestream(ds, tsyntax, options)
    photometric = meta["photometric_interpretation"]
    array = _decode_reduced(ds, tsyntax, photometric, options)
    if array is None:
        array = _decode_first_frame(ds, plugins)
    if options.defer_pixels and (tabled := display_table(array, ds, photometric)) is not None:
        return Image(None, dict(meta), table=tabled[0], index=tabled[1])
    return Image(to_display(array, ds, photometric), dict(meta))


# --- header -------------------------------------------------------------------------


class _Source:
    """The opened file, handed to pydicom as a "readable buffer" rather than a file.

    pydicom reads a deferred value (Pixel Data) by opening the *name* of a file it was
    given again, which could meet a FIFO; given a buffer, it reads through it instead.
    """

    def __init__(self, fh: BinaryIO, name: str) -> None:
        self._fh = fh
        self.name = name  # pydicom's ``filename``: error messages and the mtime check

    def read(self, size: int = -1) -> bytes:
        return self._fh.read(size)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._fh.seek(offset, whence)

    def tell(self) -> int:
        return self._fh.tell()

    @property
    def closed(self) -> bool:
        return self._fh.closed


def _read_header(path: Path, fh: BinaryIO, options: ReadOptions) -> Dataset:
    try:
        inflated = _inflate_deflated(fh, options)
        if inflated is not None:
            return _deflated_dataset(path, fh, inflated)
        fh.seek(0)
        return pydicom.dcmread(_Source(fh, str(path)), force=True, defer_size=_DEFER_SIZE)
    except FileRejected:
        raise
    except MemoryError as exc:
        raise FileRejected(Reason.TOO_LARGE, "out of memory reading the header") from exc
    except OSError as exc:
        raise FileRejected(Reason.UNREADABLE, short_error(exc)) from exc
    except Exception as exc:  # pydicom raises many types for malformed files
        raise FileRejected(Reason.CORRUPT, f"unreadable DICOM header: {short_error(exc)}") from exc


def _inflate_deflated(fh: BinaryIO, options: ReadOptions) -> Optional[bytes]:
    """The inflated data set of a Deflated Explicit VR file (``None`` for any other file, or
    when the stream is damaged: pydicom then reads it and says why), refusing one that would
    inflate past the pixel limit (a zip bomb) before it does. pydicom inflates the whole
    stream at once and without a limit, so the file is inflated here, once."""
    fh.seek(0)
    if _DEFLATED_UID not in fh.read(4096):  # cheap pre-filter, confirmed below
        return None
    fh.seek(0)
    start, tsyntax = _scan_file_meta(fh)
    if start is None or tsyntax != _DEFLATED_UID:
        return None
    fh.seek(start)
    limit = options.max_pixels * _DEFLATE_BYTES_PER_PIXEL + _DEFLATE_SLACK
    codec = inflate_codec()
    inflater = codec.decompressobj(-zlib.MAX_WBITS)
    parts: list[bytes] = []
    total = 0
    try:
        while not inflater.eof and (data := fh.read(1 << 20)):
            while data:
                parts.append(inflater.decompress(data, 1 << 24))
                total += len(parts[-1])
                if total > limit:
                    raise FileRejected(Reason.TOO_LARGE, f"deflated data set inflates to over {limit} bytes")
                data = inflater.unconsumed_tail
    except (zlib.error, codec.error):
        return None
    return b"".join(parts)


def inflate_codec():
    """The inflater of deflated data sets: Intel ISA-L's (``isal``, the same bytes as zlib's,
    1.5x as fast on a 2048 x 2500 radiograph: benchmarks/decoders.py), else zlib."""
    try:
        from isal import isal_zlib
    except ImportError:  # pragma: no cover - a declared dependency; zlib is the fallback
        return zlib
    return isal_zlib


def _deflated_dataset(path: Path, fh: BinaryIO, inflated: bytes) -> Dataset:
    """What ``pydicom.dcmread`` makes of a deflated file (its file meta, the data set read from
    the inflated bytes as explicit VR little endian), from bytes already inflated."""
    from pydicom.dataset import FileDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble

    fh.seek(0)
    read_preamble(fh, False)  # what ``read_file_meta_info(path)`` does, on the opened file
    file_meta = _read_file_meta_info(fh)
    buffer = DicomBytesIO(inflated)
    buffer.name = str(path)
    dataset = read_dataset(buffer, is_implicit_VR=False, is_little_endian=True)
    ds = FileDataset(buffer, dataset, None, file_meta, False, True)
    ds.set_original_encoding(False, True, dataset._character_set)
    return ds


def _scan_file_meta(fh: Any) -> tuple[Optional[int], bytes]:
    """Offset just past the group 0002 elements (always explicit VR LE) and the Transfer Syntax UID."""
    head = fh.read(132)
    pos = 132 if head[128:132] == b"DICM" else 0
    tsyntax = b""
    fh.seek(pos)
    while True:
        elem = fh.read(8)
        if len(elem) < 8:
            return None, tsyntax
        if int.from_bytes(elem[0:2], "little") != 0x0002:
            return pos, tsyntax
        if elem[4:6] in _LONG_LENGTH_VRS:
            extra = fh.read(4)
            if len(extra) < 4:
                return None, tsyntax
            pos += 12 + int.from_bytes(extra, "little")
        else:
            length = int.from_bytes(elem[6:8], "little")
            if elem[2:4] == b"\x10\x00":  # (0002,0010) Transfer Syntax UID
                tsyntax = fh.read(length).rstrip(b"\x00 ")
            pos += 8 + length
        fh.seek(pos)


def _transfer_syntax(ds: Dataset) -> uid.UID:
    """The file's transfer syntax; guessed from the encoding when the meta lacks it."""
    try:
        value = ds.file_meta.get("TransferSyntaxUID")
        tsyntax = uid.UID(as_text(value, 64)) if value else None
    except Exception:
        tsyntax = None
    if tsyntax:
        return tsyntax
    implicit, little = ds.original_encoding
    if implicit:
        tsyntax = uid.ImplicitVRLittleEndian
    elif little is False:
        tsyntax = uid.ExplicitVRBigEndian
    else:
        tsyntax = uid.ExplicitVRLittleEndian
    ds.file_meta.TransferSyntaxUID = tsyntax  # pydicom's decoders need it
    logger.debug("no Transfer Syntax UID; assuming %s", tsyntax.name)
    return tsyntax


def _metadata(ds: Dataset, tsyntax: uid.UID) -> dict[str, Any]:
    """Sanitised identifiers and descriptors; never the patient's name."""
    age = as_text(header_value(ds, "PatientAge"), 16)
    return {
        "study_instance_uid": valid_uid(header_value(ds, "StudyInstanceUID")),
        "series_instance_uid": valid_uid(header_value(ds, "SeriesInstanceUID")),
        "sop_instance_uid": valid_uid(header_value(ds, "SOPInstanceUID")),
        "view_position": as_text(header_value(ds, "ViewPosition")).upper(),
        "modality": as_text(header_value(ds, "Modality")).upper(),
        "patient_id": as_text(header_value(ds, "PatientID")),
        # the band, not the age: enough to pick an operating point, less identifying
        "age_band": age_band(age),
        "age_years": age_years(age),  # not written to any output
        "transfer_syntax": valid_uid(str(tsyntax)),
        "photometric_interpretation": as_text(header_value(ds, "PhotometricInterpretation")).upper(),
        "frames": frame_count(ds),
        # the acquisition group monitoring breaks results down by (devices, never people)
        "manufacturer": as_text(header_value(ds, "Manufacturer"), 64),
        "manufacturer_model_name": as_text(header_value(ds, "ManufacturerModelName"), 64),
        "station_name": as_text(header_value(ds, "StationName"), 64),
    }


def _gate(ds: Dataset, meta: dict[str, Any], options: ReadOptions) -> None:
    """Refuse, from the header alone, what should not or cannot be decoded."""
    if len(ds) == 0:  # pydicom drops everything when a file ends inside an undefined length
        raise FileRejected(Reason.CORRUPT, "no data elements (truncated?)")
    if not any(has_data(ds, keyword) for keyword in _PIXEL_TAGS):
        if header_value(ds, "Rows") is not None or header_value(ds, "Columns") is not None:
            raise FileRejected(Reason.CORRUPT, "image header without Pixel Data (truncated?)")
        sop_class = _sop_class(ds)
        if not sop_class:
            raise FileRejected(Reason.CORRUPT, "neither Pixel Data nor a SOP Class UID")
        if any(tag.group % 2 == 0 and not dictionary_has_tag(tag) for tag in ds.keys()):
            raise FileRejected(Reason.CORRUPT, "unknown standard tags and no Pixel Data (garbled?)")
        raise FileRejected(Reason.NO_PIXELS, f"no Pixel Data in {as_text(sop_class, 64)}")
    modality = meta["modality"][:16]
    if modality and modality not in CXR_MODALITIES:
        # name it only when it is a DICOM defined term: details never echo header text
        raise FileRejected(
            Reason.NOT_CXR, f"modality {modality}" if modality in DICOM_MODALITIES else "modality other than CR/DX/DR"
        )
    part, keyword = examined_part(
        {k: as_text(header_value(ds, k), 256) for k in _BODY_PART_KEYWORDS}, options.body_parts
    )
    if part is not None and part != "CHEST":
        # ``part`` is a word of our own vocabulary, never raw header text
        raise FileRejected(Reason.NOT_CHEST, f"{keyword} names {part}, not the chest")
    view = " ".join(meta["view_position"].replace("_", " ").split())
    if view in LATERAL_VIEWS and not options.include_lateral:
        raise FileRejected(Reason.LATERAL, f"view position {view[:16]}")

    rows, columns = as_int(header_value(ds, "Rows")), as_int(header_value(ds, "Columns"))
    if not rows or not columns or rows < 1 or columns < 1:
        raise FileRejected(Reason.CORRUPT, "missing or invalid Rows/Columns")
    if rows * columns > options.max_pixels:
        raise FileRejected(
            Reason.TOO_LARGE,
            f"{columns}x{rows} pixels exceeds the limit of {options.max_pixels}",
        )
    samples = as_int(header_value(ds, "SamplesPerPixel")) or 1
    bits = as_int(header_value(ds, "BitsAllocated")) or 16
    if not 1 <= samples <= 4 or not 1 <= bits <= 64:
        raise FileRejected(Reason.UNSUPPORTED_PIXELS, "Samples per Pixel or Bits Allocated out of range")
    decoded_bytes = rows * columns * samples * ((bits + 7) // 8)  # one frame: only the first is decoded
    if decoded_bytes > options.max_pixels * MAX_BYTES_PER_PIXEL:
        raise FileRejected(
            Reason.TOO_LARGE,
            f"{columns}x{rows}x{samples} samples of {bits} bits would decode to {decoded_bytes >> 20} MiB, over the "
            f"limit of {options.max_pixels * MAX_BYTES_PER_PIXEL >> 20} MiB (--max-pixels x {MAX_BYTES_PER_PIXEL} bytes)",
        )
    if header_value(ds, "NumberOfFrames") is not None and meta["frames"] != as_int(header_value(ds, "NumberOfFrames")):
        ds.NumberOfFrames = meta["frames"]  # invalid value: decode the first frame anyway

    photometric = meta["photometric_interpretation"]
    samples = as_int(header_value(ds, "SamplesPerPixel")) or 1
    if not photometric and samples == 1:
        photometric = meta["photometric_interpretation"] = "MONOCHROME2"
        ds.PhotometricInterpretation = photometric
        logger.debug("no Photometric Interpretation; assuming MONOCHROME2")
    if photometric not in _MONOCHROME | _COLOUR | {"PALETTE COLOR"}:
        known = photometric in _KNOWN_PHOTOMETRIC
        raise FileRejected(
            Reason.UNSUPPORTED_PIXELS, f"photometric interpretation {photometric if known else 'not a defined term'}"
        )


def _check_pixel_length(ds: Dataset, tsyntax: uid.UID) -> None:
    """Refuse native Pixel Data far longer than the header declares, before reading it.

    pydicom reads the whole element to decode a frame: a 64x64 image whose Pixel Data
    claims 2 GiB (a sparse file) would cost 2 GiB per worker. Encapsulated (compressed)
    Pixel Data has an undefined length and is left to the decoders and
    :func:`_check_codestream`.
    """
    if tsyntax.is_encapsulated:
        return
    for keyword in _PIXEL_TAGS:
        try:
            elem = ds.get_item(keyword, keep_deferred=True)
        except Exception:
            continue
        if elem is None:
            continue
        length = getattr(elem, "length", None)
        if length is None and elem.value is not None:
            length = len(elem.value)
        if not length or length == _UNDEFINED_LENGTH:
            continue
        rows, columns = as_int(header_value(ds, "Rows")) or 0, as_int(header_value(ds, "Columns")) or 0
        samples = as_int(header_value(ds, "SamplesPerPixel")) or 1
        bits = as_int(header_value(ds, "BitsAllocated")) or 16
        declared = (rows * columns * samples * frame_count(ds) * bits + 7) // 8
        if length > _PIXEL_EXCESS_FACTOR * declared + _PIXEL_SLACK:
            raise FileRejected(
                Reason.CORRUPT,
                f"Pixel Data holds {length} bytes, far more than the {declared} its header declares "
                "(Rows x Columns x Samples per Pixel x Bits Allocated x Number of Frames)",
            )


def _sop_class(ds: Dataset) -> str:
    """Name (or UID) of the SOP Class in the data set, else in the file meta; or ""."""
    for value in (header_value(ds, "SOPClassUID"), header_value(ds.file_meta, "MediaStorageSOPClassUID")):
        if sop_class := valid_uid(value):
            return uid.UID(sop_class).name
    return ""


# --- decoding -----------------------------------------------------------------------


def _decoding_plugins(tsyntax: uid.UID) -> tuple[str, ...]:
    """Installed pydicom plugins for ``tsyntax``, preferred first; ``("",)`` if native."""
    if valid_uid(tsyntax) != tsyntax:
        raise FileRejected(Reason.CORRUPT, "invalid Transfer Syntax UID")
    name = as_text(tsyntax.name)
    try:
        decoder = get_decoder(tsyntax)
    except Exception as exc:
        raise FileRejected(Reason.UNSUPPORTED_TRANSFER_SYNTAX, f"{name}: no decoder exists in pydicom") from exc
    if not tsyntax.is_encapsulated:
        return ("",)  # native encoding: pydicom decodes it without plugins
    available = tuple(decoder.available_plugins)
    codec = CODECS.get(tsyntax, Codec((), "pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg"))
    preferred = tuple(p for p in codec.plugins if p in available)
    plugins = preferred + tuple(p for p in available if p not in preferred)
    if not plugins:
        raise FileRejected(
            Reason.UNSUPPORTED_TRANSFER_SYNTAX,
            f"{name}: no decoder installed (pip install {codec.install})",
        )
    return plugins


def _check_codestream(ds: Dataset, tsyntax: uid.UID, options: ReadOptions) -> None:
    """Refuse a JPEG/JPEG 2000 frame whose own header declares too many pixels.

    Decoders allocate what the codestream declares, whatever Rows/Columns say.
    """
    if tsyntax not in _JPEG_FAMILY and tsyntax not in _J2K_FAMILY:
        return
    try:
        items = generate_fragments(ds.PixelData)
        next(items)  # Basic Offset Table
        fragment = next(items)
    except Exception:
        return  # the decoder will report what is wrong
    size = _jpeg_size(fragment) if tsyntax in _JPEG_FAMILY else _j2k_size(fragment)
    if size and size[0] * size[1] > options.max_pixels:
        raise FileRejected(
            Reason.TOO_LARGE,
            f"codestream declares {size[0]}x{size[1]} pixels, over {options.max_pixels}",
        )


def _jpeg_size(data: bytes) -> Optional[tuple[int, int]]:
    """(columns, rows) from the first SOF marker of a JPEG or JPEG-LS codestream."""
    if data[:2] != b"\xff\xd8":
        return None
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        is_sof = (0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC)) or marker == 0xF7
        if is_sof and pos + 9 <= len(data):
            rows = int.from_bytes(data[pos + 5 : pos + 7], "big")
            columns = int.from_bytes(data[pos + 7 : pos + 9], "big")
            return columns, rows
        if marker == 0xDA:  # start of scan before any frame header
            return None
        pos += 2 + length
    return None


def _j2k_size(data: bytes) -> Optional[tuple[int, int]]:
    """(columns, rows) from the SIZ marker of a JPEG 2000 codestream (raw or in JP2)."""
    header = reduced.j2k_header(data)
    return (header.columns, header.rows) if header else None


def _decode_reduced(ds: Dataset, tsyntax: uid.UID, photometric: str, options: ReadOptions) -> Optional[np.ndarray]:
    """Stored values of frame 0 at a reduced scale (:mod:`.reduced`), or ``None``: decode in full."""
    side = decode_side(options)
    if not side or tsyntax not in reduced.TRANSFER_SYNTAXES or photometric not in _MONOCHROME:
        return None
    layout = reduced.Layout(
        rows=as_int(header_value(ds, "Rows")) or 0,
        columns=as_int(header_value(ds, "Columns")) or 0,
        bits_allocated=as_int(header_value(ds, "BitsAllocated")) or 0,
        bits_stored=as_int(header_value(ds, "BitsStored")) or 0,
        signed=as_int(header_value(ds, "PixelRepresentation")) == 1,
    )
    if as_int(header_value(ds, "SamplesPerPixel")) not in (None, 1):
        return None
    try:
        frame = get_frame(ds.PixelData, 0, number_of_frames=frame_count(ds))
    except Exception as exc:  # pydicom will say what is wrong with the fragments
        logger.debug("no frame for a reduced decode: %s", exc)
        return None
    return reduced.decode_reduced(frame, tsyntax, layout, side)


def _decode_first_frame(ds: Dataset, plugins: tuple[str, ...]) -> np.ndarray:
    """Decode frame 0 with the first plugin that succeeds."""
    failure: Optional[BaseException] = None
    for plugin in plugins:
        try:
            return decode_pixels(ds, index=0, decoding_plugin=plugin)
        except MemoryError as exc:
            raise FileRejected(Reason.TOO_LARGE, "out of memory decoding pixels") from exc
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # decoders raise anything; Rust ones (pyo3) panic
            failure = exc
            logger.debug("plugin %r failed: %s", plugin or "native", exc)
    detail = short_error(failure) if failure else "no decoder"
    raise FileRejected(Reason.CORRUPT, f"undecodable pixel data: {detail}") from failure
