"""The PyTorch inference engine: decoder models, weight loading, tokenizers,
chat templates, sampling and the continuous-batching scheduler."""
