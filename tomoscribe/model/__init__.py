"""The tomoscribe model: encoders, projector, language model, segmentation head."""
