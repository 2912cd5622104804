"""The serving engine: the model and its owner thread, the batcher, the image pipeline, the text cache, head analyses."""
