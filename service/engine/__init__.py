"""The serving engine: the model and its owner thread, the batcher, the image pipeline, text cache, head analyses."""
