"""The reportlab layer of pneumobatch's PDFs: styles, the A4 page template, tables and figures.

The report (:mod:`.pdf`) and the monitoring PDF (:mod:`pneumobatch.operations.monitor.pdf`)
lay out their content with one :class:`Document`, so that both look alike and the
layout code exists once. Headings (and paragraphs asked to ``keep``) stay on the page
of what follows them through reportlab's ``keepWithNext``. The page footer (the
report's research-use-only line and page number) is a parameter of :meth:`Document.write`.

reportlab is imported inside the methods: importing this module stays cheap.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union
from xml.sax.saxutils import escape

#: A figure given as a file (relative to the document's figure folder) or as PNG bytes in memory.
ImageSource = Union[str, Path, io.BytesIO]


def esc(value: Any) -> str:
    """``value`` as text safe inside a reportlab paragraph (``<``, ``>``, ``&`` escaped)."""
    return escape(str(value))


def styles() -> dict[str, Any]:
    """The paragraph styles of pneumobatch's PDFs by name (``title``, ``h1``-``h3``, ``body``, ``note`` ...)."""
    from reportlab.lib import colors
    from reportlab.lib.styles import ParagraphStyle, getSampleStyleSheet

    base = getSampleStyleSheet()
    return {
        "title": base["Title"],
        "h1": ParagraphStyle("h1", parent=base["Heading1"], fontSize=15, spaceBefore=4, spaceAfter=6, keepWithNext=1),
        "h2": ParagraphStyle("h2", parent=base["Heading2"], fontSize=12, spaceBefore=10, spaceAfter=4, keepWithNext=1),
        "h3": ParagraphStyle("h3", parent=base["Heading3"], fontSize=10, spaceBefore=6, spaceAfter=3, keepWithNext=1),
        "body": ParagraphStyle("body", parent=base["BodyText"], fontSize=9, leading=11.5, spaceAfter=4),
        "note": ParagraphStyle(
            "note", parent=base["BodyText"], fontSize=8, leading=10, textColor=colors.HexColor("#444444")
        ),
        "warn": ParagraphStyle(
            "warn",
            parent=base["BodyText"],
            fontSize=10,
            leading=13,
            textColor=colors.HexColor("#a01010"),
            fontName="Helvetica-Bold",
        ),
        "td": ParagraphStyle("td", parent=base["BodyText"], fontSize=7.5, leading=9),
        "th": ParagraphStyle("th", parent=base["BodyText"], fontSize=7.5, leading=9, fontName="Helvetica-Bold"),
        "mono": ParagraphStyle("mono", parent=base["BodyText"], fontSize=7, leading=9, fontName="Courier"),
    }


class Document:
    """A platypus story on A4 pages: paragraphs, headings, tables and figures, then :meth:`write`.

    ``figure_root`` is the folder that figure paths are relative to; ``dpi`` the
    resolution figures were drawn at (a figure is placed at its size, 72 / ``dpi``
    points per pixel, shrunk to fit).
    """

    def __init__(self, figure_root: Optional[Path] = None, dpi: float = 72.0) -> None:
        from reportlab.lib.pagesizes import A4
        from reportlab.lib.units import cm

        self.root = Path(figure_root) if figure_root is not None else Path(".")
        self.dpi = float(dpi)
        self.styles = styles()
        self.story: list[Any] = []
        self.page = A4
        self.margin = 1.8 * cm
        self.width = A4[0] - 3.6 * cm

    def add(self, *flowables: Any) -> None:
        """Append reportlab flowables to the story as they are."""
        self.story.extend(flowables)

    def para(self, text: str, style: str = "body", raw: bool = False, keep: bool = False) -> None:
        """A paragraph (``raw``: ``text`` is reportlab markup); ``keep`` holds it on the page
        of what follows (an intro line)."""
        from reportlab.lib.styles import ParagraphStyle
        from reportlab.platypus import Paragraph

        chosen = self.styles[style]
        if keep:
            chosen = ParagraphStyle(f"{chosen.name}-keep", parent=chosen, keepWithNext=1)
        self.add(Paragraph(text if raw else esc(text), chosen))

    def heading(self, text: str, style: str = "h2") -> None:
        """A heading; its style keeps it on the page of what follows."""
        from reportlab.platypus import Paragraph

        self.add(Paragraph(esc(text), self.styles[style]))

    def notes(self, notes: Sequence[str]) -> None:
        """One small ``Note:`` paragraph per note."""
        for n in notes:
            self.para(f"Note: {n}", "note")

    def table(
        self,
        header: Sequence[str],
        rows: Sequence[Sequence[Any]],
        widths: Optional[Sequence[float]],
        mono: Sequence[int] = (),
    ) -> None:
        """A gridded table over the text width, columns in the proportions of ``widths``
        (None: reportlab sizes them); ``mono`` columns in a fixed-width font."""
        from reportlab.lib import colors
        from reportlab.platypus import Paragraph, Spacer, Table, TableStyle

        col_widths = None
        if widths is not None:
            total = sum(widths)
            col_widths = [w / total * self.width for w in widths]
        data = []
        if header:
            data.append([Paragraph(esc(h), self.styles["th"]) for h in header])
        for row in rows:
            data.append([Paragraph(esc(c), self.styles["mono" if j in mono else "td"]) for j, c in enumerate(row)])
        if not data:
            return
        t = Table(data, colWidths=col_widths, repeatRows=1 if header else 0, hAlign="LEFT")
        style = [
            ("GRID", (0, 0), (-1, -1), 0.3, colors.HexColor("#bbbbbb")),
            ("VALIGN", (0, 0), (-1, -1), "TOP"),
            ("TOPPADDING", (0, 0), (-1, -1), 2),
            ("BOTTOMPADDING", (0, 0), (-1, -1), 2),
        ]
        if header:
            style.append(("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#e8eef6")))
        t.setStyle(TableStyle(style))
        self.add(t, Spacer(1, 6))

    def kv(self, pairs: Sequence[tuple[str, Any]]) -> None:
        """A two-column table of names and values, without header."""
        self.table([], [[k, v] for k, v in pairs], [1, 3.2])

    def image(self, source: ImageSource, max_width: float, max_height: float) -> Any:
        """A figure flowable at its size, shrunk to fit ``max_width`` x ``max_height``."""
        from reportlab.lib.utils import ImageReader
        from reportlab.platypus import Image

        if isinstance(source, io.BytesIO):
            image: Any = source
            w, h = ImageReader(io.BytesIO(source.getvalue())).getSize()
        else:
            image = str(self.root / source)
            w, h = ImageReader(image).getSize()
        width = min(max_width, w * 72.0 / self.dpi)
        height = width * h / w
        if height > max_height:
            height = max_height
            width = height * w / h
        return Image(image, width=width, height=height)

    def figure(self, source: Optional[ImageSource], max_height: float = 330) -> None:
        """One figure over at most the text width (nothing when ``source`` is empty)."""
        from reportlab.platypus import Spacer

        if source:
            self.add(self.image(source, self.width, max_height), Spacer(1, 6))

    def figures(self, sources: Sequence[Optional[ImageSource]], max_height: float = 300) -> None:
        """Figures side by side, each in an equal share of the text width."""
        from reportlab.platypus import Spacer, Table, TableStyle

        sources = [s for s in sources if s]
        if not sources:
            return
        cell = self.width / len(sources)
        t = Table([[self.image(s, cell - 4, max_height) for s in sources]], colWidths=[cell] * len(sources))
        t.setStyle(TableStyle([("VALIGN", (0, 0), (-1, -1), "TOP"), ("LEFTPADDING", (0, 0), (-1, -1), 0)]))
        self.add(t, Spacer(1, 6))

    def write(
        self,
        out: Path,
        *,
        title: str,
        author: Optional[str] = None,
        subject: Optional[str] = None,
        footer: Optional[str] = None,
    ) -> None:
        """Lay the story out into the PDF ``out``; ``footer``, when given, is printed at the
        foot of every page with the page number."""
        from reportlab.platypus import SimpleDocTemplate, Spacer

        if self.story and self.story[-1].getKeepWithNext():
            self.add(Spacer(1, 1))  # a heading that ends the story is still kept with something

        def draw_footer(canvas, doc) -> None:
            canvas.saveState()
            canvas.setFont("Helvetica", 7)
            canvas.setFillGray(0.35)
            canvas.drawString(self.margin, 0.9 * 28.35, footer)
            canvas.drawRightString(self.page[0] - self.margin, 0.9 * 28.35, f"page {doc.page}")
            canvas.restoreState()

        template = SimpleDocTemplate(
            str(out),
            pagesize=self.page,
            leftMargin=self.margin,
            rightMargin=self.margin,
            topMargin=1.5 * 28.35,
            bottomMargin=1.6 * 28.35,
            title=title,
            author=author,
            subject=subject,
        )
        if footer is None:
            template.build(self.story)
        else:
            template.build(self.story, onFirstPage=draw_footer, onLaterPages=draw_footer)
