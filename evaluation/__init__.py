"""Evaluation on labelled data: datasets, metrics, retrieval and localisation eval, episodes, few-shot, the report."""
