"""The MoE-aware IR: canonical MoE layers, expert tables, adapters, loading, saving, tracing, verifying."""

from moeopt.ir.layer import DenseExpert, MoELayer
from moeopt.ir.load import load
from moeopt.ir.model import MoEModel, ParamStats
from moeopt.ir.spec import ExpertSpec, RouterSpec, SharedSpec
from moeopt.ir.table import ExpertTable, QuantizedMatrix, SlotInfo
from moeopt.ir.trace import moe_nodes, trace
from moeopt.ir.verify import Problem, check, verify

__all__ = [
    "DenseExpert", "ExpertSpec", "ExpertTable", "MoELayer", "MoEModel", "ParamStats", "Problem",
    "QuantizedMatrix", "RouterSpec", "SharedSpec", "SlotInfo", "check", "load", "moe_nodes", "trace", "verify",
]
