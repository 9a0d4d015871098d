"""Data: synthetic task generators and grain pipelines."""
