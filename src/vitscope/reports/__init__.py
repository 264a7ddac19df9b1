"""Reports: the papers' figures (ViT, HDVW, RAGHU, ConViT, CB) from vitscope output directories.

``build_report(run_dirs, out_html)`` reads ``vitscope probe`` / ``train`` / ``hessian`` / ``landscape`` /
``robustness`` outputs and writes one self-contained HTML page with every figure their data supports, each
captioned with its measure's definition and the paper's finding, plus PNG and CSV files per figure (and SVG on request).
"""
from vitscope.reports.build import build_report
from vitscope.reports.captions import CAPTIONS, Caption, caption
from vitscope.reports.loaders import EXPECTED_FILES, ReportInputError, RunData, load_run, load_runs

__all__ = ["build_report", "load_run", "load_runs", "RunData", "ReportInputError", "EXPECTED_FILES", "CAPTIONS",
           "Caption", "caption"]
