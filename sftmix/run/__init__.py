"""`sftmix run` and `sftmix sweep`: the stages on a run directory, its checks."""
