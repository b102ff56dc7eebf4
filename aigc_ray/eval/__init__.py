"""Offline generation quality: the domain feature net (featnet.py), FID/KID/IS/coverage/
precision-recall with floor and ceiling, and the quality card (quality.py). No Ray."""

from aigc_ray.eval.quality import evaluate_checkpoint, format_table, score_checkpoint

__all__ = ["evaluate_checkpoint", "score_checkpoint", "format_table"]
