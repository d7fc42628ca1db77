"""DICOM reader (pydicom): gate on the header, then decode the first frame for display.

Every header is untrusted. The header is read first (large elements such as Pixel
Data are deferred) and the file is refused, before any pixel is decoded, when it has
no pixels, is not a chest radiograph (Modality other than CR/DX/DR; a missing
Modality is accepted), names another body part (``not-chest``, see
:mod:`pneumobatch.io.readers.bodyparts`), is a lateral view, is larger than ``max_pixels`` or uses a
transfer syntax no installed plugin decodes. Nothing but
:class:`~pneumobatch.core.errors.FileRejected` leaves :func:`read_dicom`.

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
* Details quote no header values: quoted text in decoder messages is elided, so a
  misparsed name can never reach the CSV.
"""

from __future__ import annotations

import logging
import re
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pydicom
from pydicom import uid
from pydicom.datadict import dictionary_has_tag
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragments, get_frame
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi, apply_windowing, get_decoder
from pydicom.pixels import pixel_array as decode_pixels

from pneumobatch.core.errors import FileRejected, Reason
from pneumobatch.core.subgroups import age_band, age_years
from pneumobatch.core.uids import valid_uid
from pneumobatch.io.readers import reduced
from pneumobatch.io.readers.base import Image, ReadOptions, decode_side
from pneumobatch.io.readers.bodyparts import DESCRIPTION_KEYWORDS, examined_part

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
_QUOTED = re.compile(r"""(?<!\w)b?('[^']*'|"[^"]*")(?!\w)""")  # 'value' but not doesn't
#: VOI LUT Functions pydicom's windowing implements (PS3.3 C.11.2.1.3).
_WINDOW_FUNCTIONS = frozenset({"LINEAR", "LINEAR_EXACT", "SIGMOID"})
#: Wider windows are no window: the largest finite float32.
_MAX_WIDTH = float(np.finfo(np.float32).max)
#: Integer images spanning fewer stored values than this are windowed through a table.
_TABLE_SPAN = 1 << 16
_DEFER_SIZE = 64 * 1024  # bytes: larger elements are read only if needed
_MAX_TEXT = 128
#: Deflated data sets are inflated whole by pydicom: refuse more than this many
#: bytes per allowed pixel (plus slack for the header) before it tries.
_DEFLATE_BYTES_PER_PIXEL = 8
_DEFLATE_SLACK = 16 * 1024 * 1024
_DEFLATED_UID = uid.DeflatedExplicitVRLittleEndian.encode("ascii")
_LONG_LENGTH_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)


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
            rejection, cause = FileRejected(Reason.CORRUPT, f"malformed DICOM: {_short(exc)}"), exc
    rejection.meta = {**meta, **(getattr(rejection, "meta", None) or {})}
    raise rejection from cause


def _read(path: Path, options: ReadOptions, meta: dict[str, Any]) -> Image:
    ds = _read_header(path, options)
    tsyntax = _transfer_syntax(ds)
    meta.update(_metadata(ds, tsyntax))
    _gate(ds, meta, options)
    plugins = _decoding_plugins(tsyntax)
    _check_codestream(ds, tsyntax, options)
    photometric = meta["photometric_interpretation"]
    array = _decode_reduced(ds, tsyntax, photometric, options)
    if array is None:
        array = _decode_first_frame(ds, plugins)
    return Image(_to_display(array, ds, photometric), dict(meta))


# --- header -------------------------------------------------------------------------


def _read_header(path: Path, options: ReadOptions) -> Dataset:
    try:
        inflated = _inflate_deflated(path, options)
        if inflated is not None:
            return _deflated_dataset(path, inflated)
        return pydicom.dcmread(path, force=True, defer_size=_DEFER_SIZE)
    except FileRejected:
        raise
    except MemoryError as exc:
        raise FileRejected(Reason.TOO_LARGE, "out of memory reading the header") from exc
    except OSError as exc:
        raise FileRejected(Reason.UNREADABLE, _short(exc)) from exc
    except Exception as exc:  # pydicom raises many types for malformed files
        raise FileRejected(Reason.CORRUPT, f"unreadable DICOM header: {_short(exc)}") from exc


def _inflate_deflated(path: Path, options: ReadOptions) -> Optional[bytes]:
    """The inflated data set of a Deflated Explicit VR file (``None`` for any other file, or
    when the stream is damaged: pydicom then reads it and says why), refusing one that would
    inflate past the pixel limit (a zip bomb) before it does. pydicom inflates the whole
    stream at once and without a limit, so the file is inflated here, once."""
    with open(path, "rb") as fh:
        if _DEFLATED_UID not in fh.read(4096):  # cheap pre-filter, confirmed below
            return None
        fh.seek(0)
        start, tsyntax = _scan_file_meta(fh)
        if start is None or tsyntax != _DEFLATED_UID:
            return None
        fh.seek(start)
        limit = options.max_pixels * _DEFLATE_BYTES_PER_PIXEL + _DEFLATE_SLACK
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
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
        except zlib.error:
            return None
        return b"".join(parts)


def _deflated_dataset(path: Path, inflated: bytes) -> Dataset:
    """What ``pydicom.dcmread`` makes of a deflated file (its file meta, the data set read from
    the inflated bytes as explicit VR little endian), from bytes already inflated."""
    from pydicom.dataset import FileDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import read_dataset, read_file_meta_info

    file_meta = read_file_meta_info(path)
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
        tsyntax = uid.UID(_text(value, 64)) if value else None
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
    age = _text(_get(ds, "PatientAge"), 16)
    return {
        "study_instance_uid": valid_uid(_get(ds, "StudyInstanceUID")),
        "series_instance_uid": valid_uid(_get(ds, "SeriesInstanceUID")),
        "sop_instance_uid": valid_uid(_get(ds, "SOPInstanceUID")),
        "view_position": _text(_get(ds, "ViewPosition")).upper(),
        "modality": _text(_get(ds, "Modality")).upper(),
        "patient_id": _text(_get(ds, "PatientID")),
        # the band, not the age: enough to pick an operating point, less identifying
        "age_band": age_band(age),
        "age_years": age_years(age),  # not written to any output
        "transfer_syntax": valid_uid(str(tsyntax)),
        "photometric_interpretation": _text(_get(ds, "PhotometricInterpretation")).upper(),
        "frames": _frames(ds),
        # the acquisition group monitoring breaks results down by (devices, never people)
        "manufacturer": _text(_get(ds, "Manufacturer"), 64),
        "manufacturer_model_name": _text(_get(ds, "ManufacturerModelName"), 64),
        "station_name": _text(_get(ds, "StationName"), 64),
    }


def _gate(ds: Dataset, meta: dict[str, Any], options: ReadOptions) -> None:
    """Refuse, from the header alone, what should not or cannot be decoded."""
    if len(ds) == 0:  # pydicom drops everything when a file ends inside an undefined length
        raise FileRejected(Reason.CORRUPT, "no data elements (truncated?)")
    if not any(_has_data(ds, keyword) for keyword in _PIXEL_TAGS):
        if _get(ds, "Rows") is not None or _get(ds, "Columns") is not None:
            raise FileRejected(Reason.CORRUPT, "image header without Pixel Data (truncated?)")
        sop_class = _sop_class(ds)
        if not sop_class:
            raise FileRejected(Reason.CORRUPT, "neither Pixel Data nor a SOP Class UID")
        if any(tag.group % 2 == 0 and not dictionary_has_tag(tag) for tag in ds.keys()):
            raise FileRejected(Reason.CORRUPT, "unknown standard tags and no Pixel Data (garbled?)")
        raise FileRejected(Reason.NO_PIXELS, f"no Pixel Data in {_text(sop_class, 64)}")
    modality = meta["modality"][:16]
    if modality and modality not in CXR_MODALITIES:
        # name it only when it is a DICOM defined term: details never echo header text
        raise FileRejected(
            Reason.NOT_CXR, f"modality {modality}" if modality in DICOM_MODALITIES else "modality other than CR/DX/DR"
        )
    part, keyword = examined_part({k: _text(_get(ds, k), 256) for k in _BODY_PART_KEYWORDS}, options.body_parts)
    if part is not None and part != "CHEST":
        # ``part`` is a word of our own vocabulary, never raw header text
        raise FileRejected(Reason.NOT_CHEST, f"{keyword} names {part}, not the chest")
    view = " ".join(meta["view_position"].replace("_", " ").split())
    if view in LATERAL_VIEWS and not options.include_lateral:
        raise FileRejected(Reason.LATERAL, f"view position {view[:16]}")

    rows, columns = _int(_get(ds, "Rows")), _int(_get(ds, "Columns"))
    if not rows or not columns or rows < 1 or columns < 1:
        raise FileRejected(Reason.CORRUPT, "missing or invalid Rows/Columns")
    if rows * columns > options.max_pixels:
        raise FileRejected(
            Reason.TOO_LARGE,
            f"{columns}x{rows} pixels exceeds the limit of {options.max_pixels}",
        )
    samples = _int(_get(ds, "SamplesPerPixel")) or 1
    bits = _int(_get(ds, "BitsAllocated")) or 16
    if not 1 <= samples <= 4 or not 1 <= bits <= 64:
        raise FileRejected(Reason.UNSUPPORTED_PIXELS, "Samples per Pixel or Bits Allocated out of range")
    decoded_bytes = rows * columns * samples * ((bits + 7) // 8)  # one frame: only the first is decoded
    if decoded_bytes > options.max_pixels * MAX_BYTES_PER_PIXEL:
        raise FileRejected(
            Reason.TOO_LARGE,
            f"{columns}x{rows}x{samples} samples of {bits} bits would decode to {decoded_bytes >> 20} MiB, over the "
            f"limit of {options.max_pixels * MAX_BYTES_PER_PIXEL >> 20} MiB (--max-pixels x {MAX_BYTES_PER_PIXEL} bytes)",
        )
    if _get(ds, "NumberOfFrames") is not None and meta["frames"] != _int(_get(ds, "NumberOfFrames")):
        ds.NumberOfFrames = meta["frames"]  # invalid value: decode the first frame anyway

    photometric = meta["photometric_interpretation"]
    samples = _int(_get(ds, "SamplesPerPixel")) or 1
    if not photometric and samples == 1:
        photometric = meta["photometric_interpretation"] = "MONOCHROME2"
        ds.PhotometricInterpretation = photometric
        logger.debug("no Photometric Interpretation; assuming MONOCHROME2")
    if photometric not in _MONOCHROME | _COLOUR | {"PALETTE COLOR"}:
        known = photometric in _KNOWN_PHOTOMETRIC
        raise FileRejected(
            Reason.UNSUPPORTED_PIXELS, f"photometric interpretation {photometric if known else 'not a defined term'}"
        )


def _sop_class(ds: Dataset) -> str:
    """Name (or UID) of the SOP Class in the data set, else in the file meta; or ""."""
    for value in (_get(ds, "SOPClassUID"), _get(ds.file_meta, "MediaStorageSOPClassUID")):
        if sop_class := valid_uid(value):
            return uid.UID(sop_class).name
    return ""


# --- decoding -----------------------------------------------------------------------


def _decoding_plugins(tsyntax: uid.UID) -> tuple[str, ...]:
    """Installed pydicom plugins for ``tsyntax``, preferred first; ``("",)`` if native."""
    if valid_uid(tsyntax) != tsyntax:
        raise FileRejected(Reason.CORRUPT, "invalid Transfer Syntax UID")
    name = _text(tsyntax.name)
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
        rows=_int(_get(ds, "Rows")) or 0,
        columns=_int(_get(ds, "Columns")) or 0,
        bits_allocated=_int(_get(ds, "BitsAllocated")) or 0,
        bits_stored=_int(_get(ds, "BitsStored")) or 0,
        signed=_int(_get(ds, "PixelRepresentation")) == 1,
    )
    if _int(_get(ds, "SamplesPerPixel")) not in (None, 1):
        return None
    try:
        frame = get_frame(ds.PixelData, 0, number_of_frames=_frames(ds))
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
    detail = _short(failure) if failure else "no decoder"
    raise FileRejected(Reason.CORRUPT, f"undecodable pixel data: {detail}") from failure


# --- pixel values -------------------------------------------------------------------


def _to_display(array: np.ndarray, ds: Dataset, photometric: str) -> np.ndarray:
    """Map stored values to [0, 1] display values (Modality LUT, VOI, MONOCHROME1)."""
    if photometric == "PALETTE COLOR" and array.ndim == 2:
        array = apply_color_lut(array, ds)
    if array.ndim == 3:  # colour: pydicom has converted YBR to RGB
        if array.shape[-1] != 3:
            raise FileRejected(Reason.UNSUPPORTED_PIXELS, f"{array.shape[-1]} samples per pixel")
        luma = array.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        return _finish(_minmax(luma))
    if array.ndim != 2:
        raise FileRejected(Reason.UNSUPPORTED_PIXELS, f"unexpected pixel shape {array.shape}")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        finite = array[np.isfinite(array)]
        array = np.nan_to_num(array, nan=finite.min() if finite.size else 0.0)
    values = _modality_lut(array, ds) if _get(ds, "VOILUTSequence") else None
    display = None if values is None else _voi_lut(values, ds)
    if display is None:  # window(modality(x)) per pixel: computed once per stored value
        display = _per_stored_value(array, lambda stored: _window(_modality_lut(stored, ds), ds))
    if display is None:
        display = _minmax(_modality_lut(array, ds) if values is None else values)
    if photometric == "MONOCHROME1":
        np.subtract(1.0, display, out=display)
    return _finish(display)


def _per_stored_value(array: np.ndarray, step: Callable[[np.ndarray], Optional[np.ndarray]]) -> Optional[np.ndarray]:
    """``step(array)`` for a per-pixel ``step``, computed on each stored value once.

    An integer image spans at most :data:`_TABLE_SPAN` values: ``step`` runs on that
    range (of the image's own dtype, so every value goes through the same arithmetic)
    and the image indexes the result, much faster than pydicom's windowing on millions
    of pixels. Other images go through ``step`` as they are.
    """
    if array.dtype.kind not in "iu" or array.size < _TABLE_SPAN:
        return step(array)
    lo, hi = int(array.min()), int(array.max())
    lo = 0 if array.dtype.kind == "u" else lo  # unsigned values index the table as they are
    if hi - lo >= _TABLE_SPAN:
        return step(array)
    table = step(np.arange(lo, hi + 1).astype(array.dtype))
    if table is None:
        return None
    return table[array] if lo == 0 else table[np.subtract(array, lo, dtype=np.int32)]


def _finish(display: np.ndarray) -> np.ndarray:
    """Every path above yields [0, 1]; this guards the float32 and finite promises."""
    display = display.astype(np.float32, copy=False)
    if np.isnan(display.min()):  # min propagates NaN; one cheap pass
        display = np.clip(np.nan_to_num(display, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
    return display


def _ramp(values: np.ndarray, lower: float, width: float) -> np.ndarray:
    """``(values - lower) / width`` as a new float32 array clipped to [0, 1] (three passes)."""
    out = np.subtract(values, lower, dtype=np.float32)
    out *= np.float32(1.0 / width)
    return np.clip(out, 0.0, 1.0, out=out)


def _minmax(values: np.ndarray) -> np.ndarray:
    """Scale by the image's own range; a constant image becomes all zeros (as ``raster.minmax``)."""
    lo, hi = float(values.min()), float(values.max())
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        return np.zeros(values.shape, dtype=np.float32)
    return _ramp(values, lo, hi - lo)


def _modality_lut(array: np.ndarray, ds: Dataset) -> np.ndarray:
    """Stored values to modality values (float32 when rescaled)."""
    if _get(ds, "ModalityLUTSequence"):
        try:
            return apply_modality_lut(array, ds)
        except Exception as exc:
            logger.debug("ignoring unusable Modality LUT Sequence: %s", exc)
            return array
    slope = _float(_get(ds, "RescaleSlope"))
    intercept = _float(_get(ds, "RescaleIntercept"))
    slope = 1.0 if slope is None or slope == 0 else slope
    intercept = 0.0 if intercept is None else intercept
    if slope == 1.0 and intercept == 0.0:
        return array
    return array.astype(np.float32) * np.float32(slope) + np.float32(intercept)


def _voi_lut(values: np.ndarray, ds: Dataset) -> Optional[np.ndarray]:
    """Apply the first VOI LUT Sequence item, scaled by its output range; None if unusable."""
    if not _get(ds, "VOILUTSequence"):
        return None
    try:
        descriptor = [int(v) for v in ds.VOILUTSequence[0].LUTDescriptor]
        entries, first = descriptor[0] or 65536, descriptor[1]
        # pydicom maps the LUT's own input domain; this yields the table itself
        table = apply_voi(np.arange(first, first + entries, dtype=np.int64), ds)
    except Exception as exc:
        logger.debug("ignoring unusable VOI LUT Sequence: %s", exc)
        return None
    table = table.astype(np.float32)
    lo, hi = float(table.min()), float(table.max())
    if hi <= lo:
        return None
    table = (table - lo) / (hi - lo)
    index = np.clip(np.rint(values) - first, 0, entries - 1).astype(np.intp)
    return table[index]


def _window(values: np.ndarray, ds: Dataset) -> Optional[np.ndarray]:
    """Apply the first Window Center/Width (PS3.3 C.11.2.1.2) with pydicom; None if absent or unusable.

    pydicom's :func:`~pydicom.pixels.apply_windowing` computes the window on a data set
    holding only the parsed centre, width and function, with a one-bit output range so
    that it yields [0, 1]. An unknown function is taken as LINEAR. A width pydicom would
    refuse (LINEAR below 1, the others not positive) or beyond float32's range (no
    real window; the old float32 formula overflowed there) leaves the window unused.
    """
    center = _float(_first(_get(ds, "WindowCenter")))
    width = _float(_first(_get(ds, "WindowWidth")))
    if center is None or width is None:
        return None
    function = _text(_get(ds, "VOILUTFunction")).upper() or "LINEAR"
    if function not in _WINDOW_FUNCTIONS:
        logger.debug("unknown VOI LUT Function %r; using LINEAR", function[:16])
        function = "LINEAR"
    if (width < 1 if function == "LINEAR" else width <= 0) or width > _MAX_WIDTH:
        return None
    window = Dataset()
    window.PhotometricInterpretation = "MONOCHROME2"  # MONOCHROME1 is inverted afterwards
    window.BitsStored, window.PixelRepresentation = 1, 0  # output range [0, 1]
    # FD rather than DS: the parsed floats as they are (a DS of more than 16 characters warns)
    window.add_new(0x00281050, "FD", center)  # Window Center
    window.add_new(0x00281051, "FD", width)  # Window Width
    window.VOILUTFunction = function
    with np.errstate(over="ignore"):  # SIGMOID: exp overflows to inf far below the centre, giving 0
        return apply_windowing(values, window).astype(np.float32)


# --- untrusted values ---------------------------------------------------------------


def _has_data(ds: Dataset, keyword: str) -> bool:
    """Whether an element is present with a non-empty value, without reading deferred data."""
    try:
        elem = ds.get_item(keyword, keep_deferred=True)
    except Exception:
        return False
    if elem is None:
        return False
    if elem.value is None:  # deferred (length known) or empty
        return bool(getattr(elem, "length", 0))
    try:
        return len(elem.value) > 0
    except TypeError:
        return True  # a number


def _get(ds: Dataset, keyword: str) -> Any:
    try:
        return ds.get(keyword)
    except Exception:  # a value that cannot be converted from its VR
        return None


def _first(value: Any) -> Any:
    if isinstance(value, (list, tuple, MultiValue)):
        return value[0] if len(value) else None
    return value


def _float(value: Any) -> Optional[float]:
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if np.isfinite(number) else None


def _int(value: Any) -> Optional[int]:
    number = _float(_first(value))
    return int(number) if number is not None and number.is_integer() else None


def _frames(ds: Dataset) -> int:
    frames = _int(_get(ds, "NumberOfFrames"))
    return frames if frames and frames > 0 else 1


def _text(value: Any, limit: int = _MAX_TEXT) -> str:
    """A header value as a single printable line of at most ``limit`` characters."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    elif isinstance(value, (list, tuple, MultiValue)):
        value = "\\".join(str(v) for v in value)
    text = "".join(ch for ch in str(value) if ch.isprintable())
    return text.strip()[:limit]


def _short(exc: BaseException) -> str:
    """First line of an exception message, with quoted (possibly header) values elided."""
    text = str(exc).strip()
    text = text.splitlines()[0] if text else type(exc).__name__
    return _text(_QUOTED.sub("'...'", text), 200)
