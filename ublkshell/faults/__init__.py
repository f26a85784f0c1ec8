"""Fault injection: the rule language (grammar), the rules in a device's shared
memory (table), and the power-cut and Python faces built on them."""
