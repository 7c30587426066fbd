"""Plan before you rent: the memory and time a GRPO run needs, per pipeline stage and rank, from the
config alone (``python -m rl.plan --help``).
"""
