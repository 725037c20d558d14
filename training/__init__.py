"""Training: the metric-learning loop, heads, the objectness probe, fine-tuning the backbone's last stage."""
