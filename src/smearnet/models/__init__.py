"""Models: the backbone factory, Lightning training, the trained-model store and the inference engines."""
