"""Evaluation: per-class metrics, their files (tables, CSV, PNG), and the evaluate command."""
