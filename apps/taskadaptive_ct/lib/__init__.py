"""The TaskAdaptiveCT MONAI Label app's library: configs, infer and train tasks, strategies."""
