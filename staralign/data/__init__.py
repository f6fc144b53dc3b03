"""Data: annotation files, converters from the official downloads, geometry and
augmentation, training targets, the dataset, and synthetic faces."""
