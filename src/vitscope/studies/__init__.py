"""Orchestration of whole experiments: ``vitscope demo`` and the study recipes of ``vitscope reproduce``.

``run_demo(out, size)`` trains small ViT, ViT+CB, ConViT, ResNet and AlterNet on the embedded ELPV data
and runs every analysis; ``run_study(name, ...)`` reproduces one group of the papers' findings
(``list_studies()``; recipes in ``vitscope/studies/*.yaml``) and ends with a verdict table.
"""
from vitscope.studies.demo import DEMO_MODELS, DEMO_SIZES, run_demo
from vitscope.studies.runner import SCALES, StudyError, StudyResult, list_studies, load_study, run_study
from vitscope.studies.verdict import Verdict, decide, summarize
from vitscope.studies.zoo import ZOOS, ModelSpec, model_spec

__all__ = ["run_demo", "DEMO_MODELS", "DEMO_SIZES", "run_study", "list_studies", "load_study", "StudyResult",
           "StudyError", "SCALES", "Verdict", "decide", "summarize", "ZOOS", "ModelSpec", "model_spec"]
