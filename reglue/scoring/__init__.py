"""Scores of generated samples, in process: generate-and-score (generate_and_score), guidance sweeps (sweep), the
training evaluator (during_training), and what identifies each result so that no resume mixes settings (identity).
"""
