"""Evaluation harness: held-out perplexity and app accuracy for any HF-causal-LM-like model.

A model qualifies if ``model(input_ids=..., attention_mask=...)`` returns logits (B, T, V); the
tokenizer is a ``tokenizers.Tokenizer`` (the reference model ships ``tokenizer.json``).
"""

from __future__ import annotations

from moeopt.eval.classify import app_accuracy, gold_label_scores, label_scores
from moeopt.eval.harness import evaluate, format_table
from moeopt.eval.metrics import accuracy, macro_f1, majority_accuracy
from moeopt.eval.perplexity import perplexity

__all__ = [
    "accuracy",
    "app_accuracy",
    "evaluate",
    "format_table",
    "gold_label_scores",
    "label_scores",
    "macro_f1",
    "majority_accuracy",
    "perplexity",
]
