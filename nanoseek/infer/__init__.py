"""Inference: the continuous-batching engine on the MLA latent cache, sampling, MTP speculative decoding, the
verification loop, and the chat, generate and serve commands built on them."""
