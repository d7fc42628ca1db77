"""The report's PDF (reportlab platypus), laid out from the document model (:mod:`.build`).

The sections of the report on the shared layout layer (:class:`.document.Document`:
styles, tables, figures, headings kept with what follows). Figures come from the PNG
files :mod:`.figures` wrote; every page carries the research-use-only footer.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Optional

from pneumobatch.core.card import RECALL_TARGET
from pneumobatch.evaluation.report.cases import KINDS
from pneumobatch.evaluation.report.document import Document, esc
from pneumobatch.evaluation.report.figures import DPI, fmt, fmt_ci
from pneumobatch.evaluation.report.inputs import reasons_by_status
from pneumobatch.evaluation.report.options import RESEARCH_ONLY


def _tail(text: str, width: int) -> str:
    """``text`` cut from the left to ``width`` characters ("..." in front when cut): a path's file name stays."""
    return text if len(text) <= width else "..." + text[-(width - 3) :]


class PdfDocument(Document):
    """Builds the platypus story for one report document."""

    def __init__(self, doc: dict[str, Any], figure_root: Path, thumbnails: Optional[dict] = None) -> None:
        super().__init__(figure_root, dpi=DPI)
        self.doc = doc
        self.thumbnails = thumbnails or {}  # (model name, case index) -> PNG (:mod:`.thumbnails`)

    # --- sections
    def header(self) -> None:
        d = self.doc
        run = d["run"]
        inputs = d["inputs"]
        self.para("pneumobatch report", "title")
        self.para(RESEARCH_ONLY + " Results describe these data only and must not guide patient care.", "warn")
        kind = "evaluation against labels" if d["labelled"] else "summary of predictions (no labels given)"
        roots = run.get("roots") or ["unknown (no run.json)"]
        elapsed = run.get("elapsed_s")
        ips = run.get("images_per_second")
        self.heading("Run", "h2")
        self.kv(
            [
                ("report", kind),
                ("generated", d["generated"]),
                ("predictions file", inputs["predictions"]),
                ("labels file", inputs["labels"] or "none"),
                ("dataset roots", "; ".join(str(r) for r in roots)),
                ("predictions made by", f"pneumobatch {run.get('pneumobatch_version') or 'unknown'}"),
                ("report made by", f"pneumobatch {d['report_pneumobatch_version']}"),
                ("run started / finished", f"{run.get('started') or 'unknown'} / {run.get('finished') or 'unknown'}"),
                ("device", run.get("device") or "unknown"),
                (
                    "throughput",
                    (f"{ips:.1f} images/s" if ips else "unknown") + (f" ({elapsed:,.0f} s in all)" if elapsed else ""),
                ),
            ]
        )
        counts = run["counts"]
        self.heading(f"Files (from {run['counts_source']})", "h3")
        rows = [["files", fmt(counts.get("files")), ""], ["ok (predicted)", fmt(counts.get("ok")), ""]]
        by_status = reasons_by_status(counts.get("by_reason"))
        for status in ("skipped", "error", "other"):
            reasons = by_status.get(status, {})
            if status == "other" and not reasons:
                continue
            detail = ", ".join(f"{r}: {fmt(n)}" for r, n in reasons.items())
            rows.append([status, fmt(counts.get(status, "")) if status != "other" else "", detail])
        self.table(["outcome", "files", "by reason"], rows, [1.2, 0.8, 4])
        self.heading("Models", "h3")
        self.table(
            ["model", "task", "classes", "threshold", "weights sha256"],
            [
                [
                    m["name"],
                    m["task"],
                    ", ".join(m["classes"]),
                    fmt(m["threshold"]),
                    (m["weights_sha256"] or "unknown")[:12],
                ]
                for m in d["models"]
            ],
            [1.6, 0.9, 2.0, 0.8, 1.2],
        )
        if len(d["models"]) > 1:
            self.para("Each model has its own section below.", "note")
        self.notes(d.get("warnings", []))

    def model_section(self, m: dict[str, Any]) -> None:
        from reportlab.platypus import PageBreak

        self.add(PageBreak())
        self.heading(f"Model {m['name']}", "h1")
        cards = ", ".join(f"{k} {v:.3g}" for k, v in m["card_thresholds"].items()) or "none recorded"
        self.kv(
            [
                ("task", f"{m['task']} (classes: {', '.join(m['classes'])})"),
                (
                    "positive class",
                    m["positive"] or "none (multi-class: pred_label, by the card's rule: argmax or per-class offsets)",
                ),
                ("shipped threshold", fmt(m["threshold"])),
                ("validation thresholds", cards),
                (
                    "weights sha256",
                    f"{(m['weights_sha256'] or 'unknown')[:12]}  (full: {m['weights_sha256'] or 'unknown'})",
                ),
            ]
        )
        c = m["counts"]
        reasons = "; ".join(
            f"{s} {', '.join(f'{r}: {n:,}' for r, n in rs.items())}" for s, rs in c["by_reason"].items()
        )
        self.para(
            f"Files for this model: {c['files']:,}; ok {c['ok']:,}; skipped {c['skipped']:,}; "
            f"errors {c['error']:,}" + (f" ({reasons})" if reasons else "") + ".",
        )
        self.notes(m.get("notes", []))
        if m.get("label_error"):
            self.para(f"No evaluation: {m['label_error']}", "warn")
        if m.get("evaluation"):
            self.evaluation(m, m["evaluation"], m["join"], "image" if m["join"]["level"] == "file" else "study")
            if m.get("fine"):
                self.fine_level(m, m["fine"])
            if m.get("site_comparison"):
                self.site_comparison(m["site_comparison"])
            if m.get("study"):
                self.study(m)
            for col, sg in m["subgroups"].items():
                self.subgroups(m, col, sg)
            self.join_problems(m["join"], m.get("study"))
            self.heading("Predictions", "h2")
            self.summary(m, figure=False)
        else:
            self.summary(m, figure=True)
            for col, sg in m["subgroups"].items():
                self.unlabelled_subgroups(m, col, sg)
        if m.get("cases"):
            self.cases(m, m["cases"])

    def cases(self, m: dict[str, Any], cs: dict[str, Any]) -> None:
        """The page of cases to look at: a grid of thumbnails per kind, each captioned."""
        from reportlab.platypus import PageBreak

        if not cs["cases"] and cs.get("note"):
            self.para(f"Note: {cs['note']}.", "note")
            return
        self.add(PageBreak())
        self.heading(f"Cases to look at ({m['name']})", "h2")
        pos, n = m["positive"], cs["n"]
        if cs["labelled"] and pos:
            rule = (
                f"The most confident mistakes, as predicted (pred_label): false negatives (labelled {pos}, "
                f"called otherwise) lowest P({pos}) first, false positives highest P({pos}) first; up to {n} of each."
            )
        elif cs["labelled"]:
            rule = (
                f"The most confident misclassifications, highest probability of the predicted class first; up to {n}."
            )
        elif pos:
            rule = (
                f"No labels: the {n} highest P({pos}), and the {n} closest to the operating point "
                "(|P - threshold|, the threshold of each image's age band where the model has one)."
            )
        else:
            rule = (
                f"No labels: the {n} highest probabilities of the predicted class, and the {n} closest to the "
                "decision (smallest margin between the two most probable classes)."
            )
        self.para(
            rule + " Thumbnails: the heatmap of predict --heatmaps where the CSV names one, else the image "
            "itself; nothing from the file's header is shown (text burned into the pixels is).",
            "note",
            keep=True,
        )
        for kind in cs["kinds"]:
            items = [(i, c) for i, c in enumerate(cs["cases"]) if c["kind"] == kind]
            self.heading(f"{KINDS[kind]} ({len(items)})", "h3")
            if items:
                self.thumbnail_grid(m["name"], items)
            else:
                self.para("None.", "note")

    def thumbnail_grid(self, model: str, items: list[tuple[int, dict[str, Any]]], columns: int = 4) -> None:
        from reportlab.lib import colors
        from reportlab.lib.enums import TA_CENTER
        from reportlab.lib.styles import ParagraphStyle
        from reportlab.lib.utils import ImageReader
        from reportlab.platypus import Image, Paragraph, Spacer, Table, TableStyle

        cell = self.width / columns
        side = cell - 10
        centred = ParagraphStyle("placeholder", parent=self.styles["note"], alignment=TA_CENTER)
        caption = ParagraphStyle("caption", parent=self.styles["td"], spaceBefore=0, spaceAfter=0)
        path_caption = ParagraphStyle("caption-path", parent=self.styles["mono"], spaceBefore=2, spaceAfter=0)
        cells = []
        for i, case in items:
            png = self.thumbnails.get((model, i))
            if png is not None:  # every thumbnail fills the same box, whatever its pixel size
                w, h = ImageReader(io.BytesIO(png.getvalue())).getSize()
                scale = min(side / w, side / h)
                picture: Any = Image(png, width=w * scale, height=h * scale)
            else:
                picture = Table(
                    [[Paragraph(esc(case.get("thumbnail") or "image not found"), centred)]],
                    colWidths=[side],
                    rowHeights=[side * 0.8],
                )
                picture.setStyle(
                    TableStyle(
                        [
                            ("BACKGROUND", (0, 0), (-1, -1), colors.HexColor("#eeeeee")),
                            ("VALIGN", (0, 0), (-1, -1), "MIDDLE"),
                        ]
                    )
                )
            probability = f"P({case['probability_of']}) {fmt(case['probability'])}"
            if case["kind"] == "near-threshold" and case.get("threshold") is not None:
                probability += f" \u00b7 threshold {fmt(case['threshold'])}"
            called = f"predicted {case['pred_label']}"
            if case.get("label") is not None:
                called = f"label {case['label']} \u00b7 {called}"
            cells.append(
                [
                    picture,
                    Paragraph(esc(_tail(case["path"], int(side / 4.2))), path_caption),
                    Paragraph(esc(probability), caption),
                    Paragraph(esc(called), caption),
                ]
            )
        rows = [cells[k : k + columns] for k in range(0, len(cells), columns)]
        rows[-1] += [""] * (columns - len(rows[-1]))
        t = Table(rows, colWidths=[cell] * columns, hAlign="LEFT")
        t.setStyle(
            TableStyle(
                [
                    ("VALIGN", (0, 0), (-1, -1), "TOP"),
                    ("LEFTPADDING", (0, 0), (-1, -1), 2),
                    ("RIGHTPADDING", (0, 0), (-1, -1), 2),
                    ("BOTTOMPADDING", (0, 0), (-1, -1), 6),
                ]
            )
        )
        self.add(t, Spacer(1, 4))

    def evaluation(
        self, m: dict[str, Any], ev: dict[str, Any], join: dict[str, Any], level: str, compact: bool = False
    ) -> None:
        """Metrics of one join; ``compact`` (study level) shows fewer figures."""
        units = "studies" if level == "study" else "images"
        if not compact:
            self.heading(f"Evaluation ({level} level)", "h2")
        counts = ", ".join(f"{c} {n:,}" for c, n in ev["class_counts"].items())
        self.para(
            f"{ev['n']:,} labelled {units} joined on <b>{esc(join['key'])}</b>, label column "
            f"<b>{esc(join['label_column'])}</b>; true classes: {esc(counts)}.",
            raw=True,
        )
        auc_name = "AUC" if ev["positive"] else "macro AUC (one-vs-rest)"
        self.para(
            f"<b>Accuracy {fmt(ev['accuracy'])}, balanced accuracy {fmt(ev['balanced_accuracy'])}, "
            f"{auc_name} {fmt(ev['macro_auc'])} {fmt_ci(ev['macro_auc_ci'])}</b>",
            raw=True,
            keep=True,
        )
        rows = []
        for pc in ev["per_class"]:
            cls = pc["class"]
            roc = ev["roc"].get(cls)
            pr = ev["pr"].get(cls)
            auc = f"{fmt(roc['auc'])} {fmt_ci(roc.get('auc_ci'))}" if roc else f"as {ev['positive']}"
            rows.append(
                [
                    cls,
                    fmt(pc["support"]),
                    fmt(pc["n_predicted"]),
                    fmt(pc["precision"]),
                    fmt(pc["recall"]),
                    fmt(pc["specificity"]),
                    fmt(pc["f1"]),
                    auc,
                    fmt(pr["average_precision"]) if pr else "",
                ]
            )
        for name, avg in (("macro avg", ev["macro_avg"]), ("weighted avg", ev["weighted_avg"])):
            rows.append(
                [
                    name,
                    fmt(ev["n"]),
                    "",
                    fmt(avg["precision"]),
                    fmt(avg["recall"]),
                    fmt(avg["specificity"]),
                    fmt(avg["f1"]),
                    "",
                    "",
                ]
            )
        self.table(
            [
                "class",
                "n true",
                "n pred",
                "precision (PPV)",
                "sensitivity (recall)",
                "specificity",
                "F1",
                "AUC (95% CI)",
                "AP",
            ],
            rows,
            [1.3, 0.7, 0.7, 0.85, 0.9, 0.85, 0.6, 1.45, 0.6],
        )
        figs = m["figures"]
        if compact:
            cm = ev["confusion_matrix"]
            rows = [
                [cls, *(f"{c:,} ({f:.2f})" if f is not None else f"{c:,}" for c, f in zip(counts_row, norm_row))]
                for cls, counts_row, norm_row in zip(cm["labels"], cm["counts"], cm["row_normalised"])
            ]
            self.heading("Confusion matrix: count (fraction of true class)", "h3")
            self.table(["true \\ predicted", *cm["labels"]], rows, [1.4, *([1.0] * len(cm["labels"]))])
            self.figures([figs.get("study_roc"), None])
        else:
            self.figure(figs.get("confusion"), max_height=260)
            self.figures([figs.get("roc"), figs.get("pr")])
        if ev["operating_points"]:
            self.heading(f"Operating points ({ev['positive']} = positive)", "h3")
            rows = [
                [
                    p["name"],
                    fmt(p["threshold"], 4),
                    f"{fmt(p['sensitivity'])} {fmt_ci(p.get('sensitivity_ci'))}",
                    f"{fmt(p['specificity'])} {fmt_ci(p.get('specificity_ci'))}",
                    fmt(p["ppv"]),
                    fmt(p["npv"]),
                    fmt(p["f1"]),
                    f"{p['tp']:,} / {p['fp']:,} / {p['tn']:,} / {p['fn']:,}",
                ]
                for p in ev["operating_points"]
            ]
            self.table(
                [
                    "point",
                    "threshold",
                    "sensitivity (95% CI)",
                    "specificity (95% CI)",
                    "PPV",
                    "NPV",
                    "F1",
                    "TP / FP / TN / FN",
                ],
                rows,
                [1.3, 0.75, 1.45, 1.45, 0.55, 0.55, 0.5, 1.25],  # point: room for card_recall_target
            )
            self.para(
                f"shipped: the model's threshold; {RECALL_TARGET}: highest threshold reaching sensitivity "
                f"{self.doc['inputs']['target_recall']:g} on these data (chosen on the evaluated data, so "
                "optimistic); youden: maximises sensitivity + specificity - 1 here; card_*: thresholds chosen "
                "on the model's validation data. A case is called positive when its probability is at or above "
                "the threshold.",
                "note",
            )
        if not compact:
            cal = ev["calibration"]
            self.heading("Calibration", "h3")
            self.figure(figs.get("calibration"), max_height=300)
            rows = [[cls, fmt(c["ece"]), fmt(c["brier"])] for cls, c in cal["classes"].items()]
            if "top_label" in cal:
                rows.append(["top label (confidence)", fmt(cal["top_label"]["ece"]), ""])
                rows.append(["all classes (multiclass Brier)", "", fmt(cal.get("brier_multiclass"))])
            rows.append(["log loss", "", fmt(cal.get("log_loss"))])
            self.table(["probability of", f"ECE ({cal['n_bins']} bins)", "Brier score"], rows, [2.5, 1.2, 1.2])
        self.notes(ev.get("notes", []) + join.get("notes", []))
        bs = ev.get("bootstrap", {})
        if bs.get("n_resamples"):
            self.para(
                f"95% confidence intervals: percentile bootstrap, {bs['n_resamples']:,} resamples of the "
                f"{units}, seed {bs['seed']}.",
                "note",
            )

    def fine_level(self, m: dict[str, Any], fine: dict[str, Any]) -> None:
        """The fine classes of a two-level model: top-1 and top-3, the per-class table, the confusion matrix."""
        from reportlab.platypus import PageBreak

        self.add(PageBreak())
        self.heading("Evaluation (fine level: organism)", "h2")
        self.para(
            "Each image's true fine class is given by the model card's fallback rule from its class and the "
            f"organism its finding names ({fine['rule']}). The prediction is the CSV's fine_label (the most probable "
            "fine class below the coarse decision); top-3 counts the true fine class among fine_top3.",
            "note",
            keep=True,
        )
        top1, top3 = fine["top1"], fine["top3"]
        self.para(
            f"<b>Top-1 accuracy {fmt(top1['accuracy'])} {fmt_ci(top1['ci'])} ({top1['hits']:,} of {top1['n']:,}), "
            f"top-3 accuracy {fmt(top3['accuracy'])} {fmt_ci(top3['ci'])} ({top3['hits']:,} of {top3['n']:,}), "
            f"balanced accuracy {fmt(fine['balanced_accuracy'])} {fmt_ci(fine['balanced_accuracy_ci'])}</b>",
            raw=True,
            keep=True,
        )
        rows = [
            [
                pc["class"] + ("" if pc["class"] in fine["model_classes"] else " *"),
                pc["parent"],
                fmt(pc["support"]),
                fmt(pc["n_predicted"]),
                f"{fmt(pc['recall'])} {fmt_ci(pc['recall_ci'])}",
                f"{fmt(pc['precision'])} {fmt_ci(pc['precision_ci'])}",
                f"{fmt(pc['f1'])} {fmt_ci(pc['f1_ci'])}",
            ]
            for pc in fine["per_class"]
        ]
        self.table(
            ["fine class", "class", "n true", "n pred", "recall (95% CI)", "precision (95% CI)", "F1 (95% CI)"],
            rows,
            [1.5, 0.9, 0.6, 0.6, 1.5, 1.5, 1.5],
        )
        self.para(
            "Accuracy, recall and precision intervals: exact (Clopper-Pearson) 95%; F1 and balanced accuracy: "
            "percentile bootstrap. * a fine class the fallback rule gives but the model does not have.",
            "note",
        )
        self.figure(m["figures"].get("fine_confusion"), max_height=420)
        self.notes(fine.get("notes", []))

    def site_comparison(self, sc: dict[str, Any]) -> None:
        """Shipped and site operating points on the same labelled images, side by side."""
        self.heading(f"Shipped vs site operating points (site file {sc['site_file']})", "h2")
        shipped, site = sc["rules"]

        def threshold(row: dict[str, Any]) -> str:
            applied = row["thresholds"]
            if len(applied) > 1:
                return "per age band (below)"
            return f"{fmt(applied[0]['threshold'], 4)} ({applied[0]['operating_point']})"

        rows = [
            [
                row["where"] if rule is shipped else "",
                rule["rule"],
                f"{row['n_positive']:,} / {row['n_negative']:,}",
                threshold(row),
                f"{fmt(row['sensitivity'])} {fmt_ci(row.get('sensitivity_ci_exact'))}",
                f"{fmt(row['specificity'])} {fmt_ci(row.get('specificity_ci_exact'))}",
                fmt(row["ppv"]),
                fmt(row["npv"]),
            ]
            for pair in zip(shipped["rows"], site["rows"])
            for rule, row in zip((shipped, site), pair)
        ]
        self.table(
            [
                "images",
                "rule",
                "n pos / neg",
                "threshold (point)",
                "sensitivity (95% CI)",
                "specificity (95% CI)",
                "PPV",
                "NPV",
            ],
            rows,
            [0.8, 0.7, 0.9, 1.5, 1.45, 1.45, 0.55, 0.55],
        )
        self.para(
            f"Temperature: shipped {fmt(shipped['temperature'])}, site {fmt(site['temperature'])}; each threshold is on "
            "the probability scale of its own rule. " + " ".join(n[0].upper() + n[1:] + "." for n in sc["notes"]),
            "note",
        )

    def study(self, m: dict[str, Any]) -> None:
        st = m["study"]
        self.heading("Study level", "h2")
        self.para(
            "Each study carries the class its labelled images agree on; its prediction is the study "
            "prediction of predict (that of its most abnormal image).",
            "note",
        )
        self.evaluation(m, st["evaluation"], st["join"], "study", compact=True)
        conflict = st["join"]["problems"].get("conflicting_study_labels", {})
        if conflict.get("count"):
            self.para(
                f"{conflict['count']:,} studies left out: their images carry different classes "
                f"(e.g. {', '.join(conflict['examples'][:3])}).",
                "note",
            )

    def subgroups(self, m: dict[str, Any], col: str, sg: dict[str, Any]) -> None:
        self.heading(f"Subgroups by {col}", "h2")
        binary = m["positive"] is not None
        rows = []
        for g in sg["groups"]:
            flag = " *" if g["small"] else ""
            if binary:
                rows.append(
                    [
                        g["value"] + flag,
                        fmt(g["n"]),
                        fmt(g.get("n_positive")),
                        f"{fmt(g['auc'])} {fmt_ci(g['auc_ci'])}",
                        fmt(g.get("sensitivity")),
                        fmt(g.get("specificity")),
                        fmt(g.get("ppv")),
                        fmt(g.get("npv")),
                    ]
                )
            else:
                rows.append(
                    [
                        g["value"] + flag,
                        fmt(g["n"]),
                        f"{fmt(g['auc'])} {fmt_ci(g['auc_ci'])}",
                        fmt(g["accuracy"]),
                        fmt(g["balanced_accuracy"]),
                    ]
                )
        if binary:
            header = [col, "n", "n positive", "AUC (95% CI)", "sensitivity", "specificity", "PPV", "NPV"]
            widths = [1.6, 0.7, 0.8, 1.6, 0.9, 0.9, 0.6, 0.6]
        else:
            header = [col, "n", "macro AUC (95% CI)", "accuracy", "balanced accuracy"]
            widths = [2.0, 0.8, 1.8, 1.0, 1.2]
        self.table(header, rows, widths)
        extra = "Sensitivity and specificity at the shipped threshold. " if binary else ""
        omitted = (
            f" {sg['omitted_groups']} smaller groups ({sg['omitted_n']:,} rows) not shown."
            if sg["omitted_groups"]
            else ""
        )
        self.para(f"{extra}* fewer than 30 samples: interpret with care.{omitted}", "note")

    def unlabelled_subgroups(self, m: dict[str, Any], col: str, sg: dict[str, Any]) -> None:
        self.heading(f"Predictions by {col}", "h2")
        classes = m["classes"]
        rows = [
            [g["value"], fmt(g["n"]), *(fmt(g["prediction_counts"].get(c, 0)) for c in classes)] for g in sg["groups"]
        ]
        self.table([col, "n", *(f"pred {c}" for c in classes)], rows, [2.0, 0.8, *([1.0] * len(classes))])

    def join_problems(self, join: dict[str, Any], study: Optional[dict[str, Any]]) -> None:
        self.heading("Join problems", "h2")
        self.para(
            f"Labels file: {join['n_label_rows']:,} rows; predictions with status ok: {join['n_prediction_rows']:,}; "
            f"matched: {join['n_matched']:,}.",
            keep=True,
        )
        rows = []
        problems = dict(join["problems"])
        if study:
            problems.update(study["join"]["problems"])
        for p in problems.values():
            if not p["count"]:
                continue
            breakdown = ", ".join(f"{k} ({v:,})" for k, v in list(p["breakdown"].items())[:6])
            rows.append([p["title"], fmt(p["count"]), "; ".join(p["examples"][:4]), breakdown])
        if rows:
            self.table(["problem", "count", "examples", "by value / reason"], rows, [2.0, 0.6, 2.6, 1.6])
        else:
            self.para("None: every label matched a prediction and every prediction has a label.", "note")

    def summary(self, m: dict[str, Any], figure: bool) -> None:
        s = m["summary"]
        if figure:
            self.heading("Predictions (no labels)", "h2")
        n_pred = sum(s["prediction_counts"].values())
        rows = [
            [c, fmt(n), fmt(s["prediction_fractions"].get(c)), fmt(s["mean_probability"].get(c))]
            for c, n in s["prediction_counts"].items()
        ]
        self.table(["predicted class", "images", "fraction", "mean probability"], rows, [2, 1, 1, 1.2])
        if s.get("near_threshold") is not None and n_pred:
            self.para(f"{s['near_threshold']:,} of {n_pred:,} predictions lie within 0.05 of the threshold.", "note")
        if (a := m.get("applicability")) is not None:
            self.para(
                f"{a['not_applicable']:,} of {a['scored']:,} predicted images are flagged not applicable "
                "(unlike the images the model was trained on; CSV column applicable).",
                "note",
            )
        if figure:
            self.figure(m["figures"].get("summary"), max_height=260)
            reasons = s["reason_counts"]
            rows = [[status, r, fmt(n)] for status, rs in reasons.items() for r, n in rs.items()]
            if rows:
                self.heading("Skipped and failed files", "h3")
                self.table(["status", "reason", "files"], rows, [1, 2, 1])
            ips = s.get("images_per_second")
            self.para(f"Throughput: {ips:.1f} images/s." if ips else "Throughput: unknown (no run.json).", "body")

    def build(self, out: Path) -> None:
        self.header()
        for m in self.doc["models"]:
            self.model_section(m)
        names = ", ".join(m["name"] for m in self.doc["models"])
        self.write(
            out,
            title=f"pneumobatch report: {names}",
            author="pneumobatch",
            subject=RESEARCH_ONLY,
            footer=f"pneumobatch report \u00b7 {RESEARCH_ONLY}",
        )
