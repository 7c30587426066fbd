"""Declarative HF <-> Megatron-Core tensor mapping: rule types, family files, plans.

Pure data and pure tensor functions: no files, no process groups (those live in ``convert/``
and ``rl/``). Start with ``mapping.registry.family_for(config)``.
"""
