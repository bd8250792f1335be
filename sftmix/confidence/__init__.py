"""Step 1: each example's confidence from training dynamics, and the confident split.

Bottom to top: split.py (the rule: confidence, the median split, one-run SFTMix's settings), online.py (the online
records and their confidence), scoring.py (the no-grad scorer), callback.py (the one scoring callback: reference run,
data map, one-run SFTMix; the confidence file), reference.py (the reference run, the join to the target's data)."""
