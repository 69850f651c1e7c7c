"""Drivers that run many configs and summarise them (python -m experiments.ablate)."""
