"""Step 1: confidence from training dynamics (reference run, scoring, the split)."""
