"""Models and their loading: the Llama-family decoder, the BERT encoder, HF and GGUF configs and weights, the demo model."""
