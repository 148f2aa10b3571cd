"""Bundled examples: small models trained in seconds on data that ships with scikit-learn."""
