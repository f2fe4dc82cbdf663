"""`python -m export`: the encoder-only export command, its TF Serving config and REST client."""
