"""What we know before we decide: the model's shape, its weights, calibration text, sensitivity, hardware."""
