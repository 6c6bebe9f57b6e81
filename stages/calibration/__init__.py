"""Calibration engine: statistics observers and the passes that drive data through the model."""
