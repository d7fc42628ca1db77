"""Every name under an input folder gets a row: links, special files, unreadable folders."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from pneumobatch.cli import main
from pneumobatch.core.errors import Reason
from pneumobatch.io import discovery
from pneumobatch.io.discovery import walk


def problems(roots, **kw) -> dict[str, object]:
    return {e.relpath: (e.problem[0] if e.problem else None) for _, e in walk(roots, **kw)}


def test_dangling_link_fifo_and_external_link_each_get_an_entry(tmp_path: Path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "secret.png").write_bytes(b"x")
    root = tmp_path / "export"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "ok.dcm").write_bytes(b"abc")
    (root / "dangling").symlink_to(root / "missing")
    (root / "ext_file").symlink_to(outside / "secret.png")
    (root / "ext_dir").symlink_to(outside)
    (root / "inner").symlink_to(root / "sub" / "ok.dcm")  # a link inside the root is followed
    os.mkfifo(root / "pipe")
    assert problems([root]) == {
        "dangling": Reason.BROKEN_LINK,
        "ext_dir": Reason.EXTERNAL_LINK,
        "ext_file": Reason.EXTERNAL_LINK,
        "inner": None,
        "pipe": Reason.SPECIAL_FILE,
        "sub/ok.dcm": None,
    }
    followed = problems([root], follow_external_links=True)
    assert followed["ext_file"] is None and followed["ext_dir/secret.png"] is None


def test_a_fifo_given_as_input_is_a_row_not_a_hang(tmp_path: Path):
    os.mkfifo(tmp_path / "pipe")
    assert problems([tmp_path / "pipe"]) == {"pipe": Reason.SPECIAL_FILE}


def test_an_unlistable_folder_is_an_unreadable_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    root = tmp_path / "export"
    (root / "locked").mkdir(parents=True)
    (root / "locked" / "a.dcm").write_bytes(b"x")
    (root / "b.dcm").write_bytes(b"x")
    real_scandir = os.scandir

    def scandir(path):  # root bypasses permission bits, so deny like a share would
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(discovery.os, "scandir", scandir)
    entries = {e.relpath: e.problem for _, e in walk([root])}
    assert entries == {"b.dcm": None, "locked/": (Reason.UNREADABLE, "folder: permission denied")}


def test_predict_writes_rows_for_them_and_exits_1_for_the_unreadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    root = tmp_path / "export"
    (root / "locked").mkdir(parents=True)
    (root / "dangling").symlink_to(root / "missing")
    os.mkfifo(root / "pipe")
    real_scandir = os.scandir
    monkeypatch.setattr(
        discovery.os,
        "scandir",
        lambda p: (_ for _ in ()).throw(PermissionError(13, "denied")) if Path(p).name == "locked" else real_scandir(p),
    )
    out = tmp_path / "p.csv"
    result = CliRunner().invoke(main, ["predict", str(root), "-o", str(out), "--quiet", "--workers", "0"])
    assert result.exit_code == 1, result.output
    rows = {r["path"]: (r["status"], r["reason"]) for r in csv.DictReader(out.open())}
    assert rows == {
        "dangling": ("skipped", "broken-link"),
        "locked/": ("error", "unreadable"),
        "pipe": ("skipped", "special-file"),
    }


def make_tree(root: Path) -> None:
    for rel in ["b/2.dcm", "b/10.dcm", "a/deep/er/x", "a/y", "top.png"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(rel.encode())


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
def test_walk_is_recursive_sorted_and_survives_link_loops(tmp_path: Path):
    root = tmp_path / "export"
    make_tree(root)
    (root / "a" / "deep" / "loop").symlink_to(root / "a")  # folder link to an ancestor
    (root / "b" / "up").symlink_to("..")  # relative link to its parent
    (root / "dangling").symlink_to(root / "nowhere")

    first = [entry.relpath for _, entry in walk([root])]
    assert first == ["a/deep/er/x", "a/y", "b/10.dcm", "b/2.dcm", "dangling", "top.png"]
    assert [entry.relpath for _, entry in walk([root])] == first  # deterministic
    entries = [entry for _, entry in walk([root]) if entry.problem is None]
    assert all(entry.path.is_file() and entry.size == len(entry.relpath) for entry in entries)
    assert [e.problem[0] for _, e in walk([root]) if e.relpath == "dangling"] == [Reason.BROKEN_LINK]


def test_walk_accepts_a_file_root(tmp_path: Path):
    path = tmp_path / "single.dcm"
    path.write_bytes(b"x")
    [(root, entry)] = list(walk([path]))
    assert root == path and entry.relpath == "single.dcm" and entry.size == 1


# --- blank and degenerate images (issue 12, item 8) -------------------------------------

from PIL import Image as PILImage  # noqa: E402

from pneumobatch.core.errors import FileRejected  # noqa: E402
from pneumobatch.io.discovery import sniff  # noqa: E402
from pneumobatch.io.readers import ReadOptions, read_image  # noqa: E402
from pneumobatch.testing.synthetic import write_cxr  # noqa: E402


def _reason(path: Path) -> str:
    try:
        read_image(path, sniff(path), ReadOptions())
    except FileRejected as exc:
        return exc.reason.value
    return "ok"


def _png(path: Path, array) -> Path:
    PILImage.fromarray(array).save(path)
    return path


def test_blank_and_degenerate_images_are_refused(tmp_path: Path):
    import io

    import numpy as np

    black = _png(tmp_path / "black.png", np.zeros((256, 256), np.uint8))
    white = _png(tmp_path / "white.png", np.full((256, 256), 255, np.uint8))
    tiny = _png(tmp_path / "tiny.png", np.array([[7]], np.uint8))
    flat = tmp_path / "flat.dcm"
    write_cxr(flat, np.full((128, 128), 900, np.uint16), bits_stored=12)
    buffer = io.BytesIO()
    PILImage.fromarray((np.random.default_rng(0).random((2000, 2000)) * 255).astype(np.uint8)).save(buffer, "JPEG")
    hollow = tmp_path / "hollow.jpg"
    hollow.write_bytes(buffer.getvalue()[:700])  # declares 2000x2000, holds almost nothing
    real = _png(tmp_path / "real.png", (np.add.outer(np.arange(256), np.arange(256)) % 256).astype(np.uint8))
    assert {p.name: _reason(p) for p in (black, white, tiny, flat, hollow, real)} == {
        "black.png": "blank-image",
        "white.png": "blank-image",
        "tiny.png": "blank-image",
        "flat.dcm": "blank-image",
        "hollow.jpg": _reason(hollow),
        "real.png": "ok",
    }
    assert _reason(hollow) in ("blank-image", "corrupt")


def test_float_pixels_that_are_not_finite_are_refused():
    import numpy as np

    from pneumobatch.io.readers import check_content

    pixels = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    check_content(pixels)
    pixels[3, 4] = np.nan
    with pytest.raises(FileRejected, match="not finite"):
        check_content(pixels)


def test_the_decode_guard_counts_bytes_not_only_pixels(tmp_path: Path):
    """An RGB image within the pixel limit but over the byte budget is refused before decoding."""
    import numpy as np
    from pydicom.uid import ExplicitVRLittleEndian

    from pneumobatch.io.readers.dicom import read_dicom

    path = tmp_path / "rgb.dcm"
    ds = write_cxr(path, np.zeros((64, 64), np.uint8))
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.PixelData = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8).tobytes()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    assert read_dicom(path, ReadOptions(max_pixels=64 * 64 * 2)).pixels.shape == (64, 64)  # 12 KiB <= 16 KiB
    with pytest.raises(FileRejected) as info:
        read_dicom(path, ReadOptions(max_pixels=64 * 64))  # 12 KiB > 8 KiB, though 4096 pixels <= 4096
    assert info.value.reason is Reason.TOO_LARGE and "MiB" in info.value.detail


# --- header text never reaches `detail`; UIDs are valid or blank (issue 12, item 17) -------


@pytest.mark.filterwarnings("ignore:Invalid value for VR", "ignore:The value length")
def test_details_name_only_defined_terms_and_overlong_uids_are_blanked(tmp_path: Path):
    import numpy as np

    from pneumobatch.io.readers.dicom import read_dicom

    pixels = (np.arange(64 * 64).reshape(64, 64) % 4096).astype(np.uint16)
    ct, odd = tmp_path / "ct.dcm", tmp_path / "odd.dcm"
    write_cxr(ct, pixels, modality="CT")
    write_cxr(odd, pixels, modality="DX", extra={"Modality": "SMITH^JOHN"})
    details = {}
    for path in (ct, odd):
        with pytest.raises(FileRejected) as info:
            read_dicom(path, ReadOptions())
        details[path.name] = info.value.detail
    assert details == {"ct.dcm": "modality CT", "odd.dcm": "modality other than CR/DX/DR"}

    long_uid = "1.2." + ".".join(["123456789"] * 8)  # 83 characters: invalid, not to be truncated
    path = tmp_path / "uid.dcm"
    write_cxr(path, pixels, study_instance_uid=long_uid)
    assert read_dicom(path, ReadOptions()).meta["study_instance_uid"] == ""


def test_exif_orientation_is_applied(tmp_path: Path):
    import numpy as np

    array = np.zeros((40, 80), np.uint8)
    array[:, :40] = 255  # left half white
    image = PILImage.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif.tobytes(), quality=95)
    pixels = read_image(path, sniff(path), ReadOptions()).pixels
    assert pixels.shape == (80, 40)
    assert pixels[:40].mean() > 0.9 and pixels[40:].mean() < 0.1  # white now on top


# --- file names that are not UTF-8 or hold line breaks (issue 12, items 1 and 2) ----------


@pytest.mark.parametrize(
    "raw",
    [
        b"caf\xe9.dcm",
        b"a\rb.dcm",
        b"line\nbreak.png",
        b"back\\slash.dcm",
        b"tab\tand \xff\xfe.jpg",
        "tōrax.dcm".encode(),
    ],
)
def test_escaped_names_are_one_printable_line_and_lossless(raw: bytes):
    from pneumobatch.io.discovery import escape_path, unescape_path

    text = escape_path(os.fsdecode(raw))
    assert text.isprintable() and text.encode("utf-8")
    assert os.fsencode(unescape_path(text)) == raw


def test_predict_and_resume_with_hostile_file_names(tmp_path: Path):
    import numpy as np

    root = tmp_path / "export"
    root.mkdir()
    names = [b"caf\xe9.png", b"cr\rlf\n.png", b"plain.png"]
    image = PILImage.fromarray((np.add.outer(np.arange(64), np.arange(64)) * 2 % 256).astype(np.uint8))
    for name in names:
        image.save(os.path.join(os.fsencode(root), name), format="PNG")
    out = tmp_path / "p.csv"
    args = ["predict", str(root), "-o", str(out), "--quiet", "--workers", "0"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(out.open(encoding="utf-8", newline="")))
    assert sorted(r["path"] for r in rows) == ["caf\\xe9.png", "cr\\x0dlf\\x0a.png", "plain.png"]
    assert all(r["status"] == "ok" for r in rows)
    assert len(out.read_text(encoding="utf-8").splitlines()) == 1 + len(names)  # no row split by a line break
    before = out.read_bytes()
    result = CliRunner().invoke(main, [*args, "--resume"])
    assert result.exit_code == 0, result.output
    assert sorted(r["path"] for r in csv.DictReader(out.open(encoding="utf-8", newline=""))) == sorted(
        r["path"] for r in rows
    )
    assert out.read_bytes() == before


# --- permissions of written files (issue 12, item 16) --------------------------------------


def test_new_files_follow_the_umask_and_replaced_files_keep_their_mode(tmp_path: Path):
    from pneumobatch.io.atomicfile import atomic_write

    old = os.umask(0o022)
    try:
        new = tmp_path / "new.json"
        atomic_write(new, lambda p: (p.write_text("{}"), os.chmod(p, 0o600)))  # as a library writing 0600 would
        assert new.stat().st_mode & 0o777 == 0o644
        kept = tmp_path / "kept.csv"
        kept.write_text("a\n")
        os.chmod(kept, 0o640)
        atomic_write(kept, "b\n")
        assert kept.stat().st_mode & 0o777 == 0o640 and kept.read_text() == "b\n"
    finally:
        os.umask(old)


# --- a decompression bomb's message names --max-pixels, not Pillow's limit (item 17) -------


def _png_declaring(path: Path, width: int, height: int) -> Path:
    """A PNG whose header declares ``width`` x ``height`` but whose data are a few bytes."""
    import io
    import struct
    import zlib

    buffer = io.BytesIO()
    PILImage.new("L", (8, 8)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    ihdr = bytearray(data[12:29])  # chunk type + 13 bytes of IHDR data
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("size", [(9000, 9000), (20000, 10000)])  # over --max-pixels; over Pillow's own bomb limit
def test_a_bomb_is_too_large_with_a_message_naming_max_pixels(tmp_path: Path, size):
    path = _png_declaring(tmp_path / "bomb.png", *size)
    with pytest.raises(FileRejected) as info:
        read_image(path, sniff(path), ReadOptions())
    assert info.value.reason is Reason.TOO_LARGE
    assert "--max-pixels" in info.value.detail and "bomb" not in info.value.detail.lower()


def test_a_path_cell_is_resolved_only_inside_its_root(tmp_path: Path):
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (root / "a" / "x.dcm").write_bytes(b"x")
    (tmp_path / "secret").write_bytes(b"s")
    os.symlink(tmp_path / "secret", root / "out")
    os.symlink(root / "a" / "x.dcm", root / "in")
    assert discovery.resolve_inside(root, "a/x.dcm") == root / "a" / "x.dcm"
    assert discovery.resolve_inside(root, "in") == root / "in"  # a link inside the root is an input like any other
    for cell in ("../secret", "a/../../secret", str(tmp_path / "secret"), "out", ""):
        assert discovery.resolve_inside(root, cell) is None, cell


def test_input_file_finds_each_file_by_the_path_predict_gave_it(tmp_path: Path):
    """input_file inverts predict's naming: one root, several roots with the same name, a file root, a spool."""
    from pneumobatch.predict import _entries

    for rel in ("a/studies/s1/x.dcm", "b/studies/s1/x.dcm", "b/studies/y.png", "other/z.dcm", "single.dcm"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(rel.encode())
    (tmp_path / "secret").write_bytes(b"s")
    os.symlink(tmp_path / "secret", tmp_path / "other" / "out")
    runs = [
        ([tmp_path / "a" / "studies"], None),
        ([tmp_path / "a" / "studies", tmp_path / "b" / "studies", tmp_path / "other", tmp_path / "single.dcm"], None),
        ([tmp_path / "a" / "studies" / "s1", tmp_path / "other"], None),
        ([tmp_path / "a" / "studies"], tmp_path / "a"),  # predict --spool: paths from the roots' parent
    ]
    for roots, relative_to in runs:
        entries = [e for e in _entries(roots, relative_to=relative_to) if e.problem is None]
        assert entries
        for entry in entries:
            assert discovery.input_file(entry.relpath, roots) == entry.path.resolve(), entry.relpath
    roots = [tmp_path / "other"]
    for cell in ("out", "../secret", str(tmp_path / "secret"), "missing.dcm", ""):
        assert discovery.input_file(cell, roots) is None, cell
    assert discovery.input_file("z.dcm", [tmp_path / "gone"]) is None
