"""The stages of `sftmix run` on a run directory (sftmix.recipe calls them in order) and `sftmix sweep`.

session (validate, lock, config.yaml) -> stages (data, step 1, train, eval, report), on context (process, timing,
model loading), fingerprints (what each stage read), examples (selection and split), publish (the trained model),
clock (whole-run training metrics), config_file; validation checks every setting first; sweep runs many configs.
"""
