"""Observation: the shared statistics memory, stats, trace reading and the renderers every face shares."""
