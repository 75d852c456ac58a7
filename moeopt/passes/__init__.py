"""Pass infrastructure and every registered pass (importing this package registers them)."""

from moeopt.passes import (
    analyses,
    canonicalize,
    importance,
    lower,
    match,
    merge,
    plan,
    predictor,
    print_ir,
    prune,
    quantize,
    refit,
    sensitivity,
    verify_ir,
)
from moeopt.passes.base import (
    ALL,
    ANALYSES,
    AnalysisManager,
    Pass,
    PassContext,
    PassResult,
    register_analysis,
)
from moeopt.passes.manager import PassManager, RunReport
from moeopt.passes.options import Option, OptionTypeError
from moeopt.passes.pipeline import Pipeline, PipelineSyntaxError, parse_pipeline
from moeopt.passes.registry import REGISTRY, UnknownOptionError, UnknownPassError, build, get_pass, register

del (analyses, canonicalize, importance, lower, match, merge, plan, predictor, print_ir, prune, quantize, refit,
     sensitivity, verify_ir)

__all__ = [
    "ALL", "ANALYSES", "REGISTRY", "AnalysisManager", "Option", "OptionTypeError", "Pass", "PassContext",
    "PassManager", "PassResult", "Pipeline", "PipelineSyntaxError", "RunReport", "UnknownOptionError",
    "UnknownPassError", "build", "get_pass", "parse_pipeline", "register", "register_analysis",
]
