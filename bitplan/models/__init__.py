"""What a model is: architectures as data, the ModelSpec read from config.json, and its files."""
